"""The variable-level fault model: residencies against hand-computed tilings, the law of the
corrupted reads, and operand faults applied by the injection graph against a dense reference
(every product and running sum recomputed one at a time with the flipped operand)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.campaigns.evaluate import campaign_graph
from onnxft.faults import variable as V
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession

RTOL = 1e-5



def _read_masks(faults, m: int, n: int, k: int, group=None) -> tuple[int, int]:
    """XOR masks of the input ``A[m, k]`` and the weight ``B[k, n]`` as the product ``(m, n, k)``
    reads them under ``faults`` (the reference's rule: a corrupted copy is read by the products
    ``first <= n < end`` (input) or ``first <= m < end`` (weight); a bit flipped twice is restored)."""
    am = bm = 0
    for f in faults:
        if group is not None and f.group != group:
            continue
        if f.kind == "weight" and (k, n) == (f.index0, f.index1) and f.first <= m < f.end:
            bm ^= 1 << f.bit
        if f.kind == "input" and (m, k) == (f.index0, f.index1) and f.first <= n < f.end:
            am ^= 1 << f.bit
    return am, bm

def test_parse_hw():
    assert str(V.parse_hw("ws:128x128")) == "ws:128x128"
    assert V.parse_hw("gpu:64x64x8").dims == (64, 64, 8)
    assert V.parse_hw("EQUAL").kind == "equal"
    for bad in ("ws:4", "gpu:4x4", "xs:4x4", "ws:0x4", "ws"):
        with pytest.raises(ValueError):
            V.parse_hw(bad)


def test_residency_counts_against_hand_computed_tilings():
    # M=4 rows, N=3 columns, K=5 (docs/resiliency_accuracy.md, worked example)
    ws = V.exposure(V.parse_hw("ws:2x2"), 4, 3, 5)
    # 15 weights held while the 4 rows stream through; 20 inputs through column tiles of 2 and 1
    # (2 + 1 = 3 cycles each); 12 outputs x 4 partial sums s_1..s_4 of one cycle each
    assert ws == {"weight": 60, "input": 60, "psum": 48}
    assert V.exposure(V.parse_hw("os:2x2"), 4, 3, 5) == ws
    assert V.exposure(V.parse_hw("is:2x2"), 4, 3, 5) == ws
    # gpu 2x2x2: K chunks of 2, 2, 1 -> residency 2,2,2,2,1 (sum of squares of chunk lengths = 9);
    # inputs: 4 rows x 2 column tiles x 9 = 72; weights: 3 columns x 2 row tiles x 9 = 54
    assert V.exposure(V.parse_hw("gpu:2x2x2"), 4, 3, 5) == {"weight": 54, "input": 72, "psum": 48}
    assert V.exposure(V.parse_hw("equal"), 4, 3, 5) == {"weight": 15, "input": 20, "psum": 0}


def _reads(hw, kind, m, n, k, count=200_000, seed=0):
    rng = np.random.default_rng(seed)
    i0, i1, first, end = V.corrupted_reads(V.parse_hw(hw), kind, m, n, k, rng, count)
    return i0, i1, first, end - first


def _z(sample_mean, mean, var, n):
    return (sample_mean - mean) / math.sqrt(var / n)


@pytest.mark.parametrize("hw,kind,lengths", [
    # ws weight: stationary over M=4 rows, flip at cycle t uniform in 0..3 -> rows t..3
    ("ws:2x2", "weight", {4: 1, 3: 1, 2: 1, 1: 1}),
    # os weight: passes through row tiles of R=2: starts 0,1,2,3 -> 2,1,2,1 reads
    ("os:2x2", "weight", {2: 2, 1: 2}),
    # ws input: column tiles of C=2 over N=3: columns 0,1 | 2 -> 2,1 | 1 reads
    ("ws:2x2", "input", {2: 1, 1: 2}),
    # is input: stationary while the N=3 columns stream -> 3,2,1 reads
    ("is:2x2", "input", {3: 1, 2: 1, 1: 1}),
    # gpu 2x2x2 input: copy per column tile (2 or 1 columns), read at cycle k mod 2 of its chunk;
    # hit iff the flip is not after that read: P = sum_k (k mod 2 + 1) / sum_k L(k) = 7/9
    ("gpu:2x2x2", "input", None),
    ("equal", "weight", {4: 1}),
])
def test_corrupted_reads_follow_the_dataflow(hw, kind, lengths):
    m, n, k = 4, 3, 5
    i0, i1, first, length = _reads(hw, kind, m, n, k)
    if lengths is None:
        hit = length > 0
        z = _z(hit.mean(), 7 / 9, (7 / 9) * (2 / 9), len(hit))
        assert abs(z) < 4.5, z
        # which tile: 2 column tiles equally likely; the hit copies read the whole tile
        assert set(np.unique(length[hit])) == {1, 2}
        # reduction index drawn proportional to its chunk length: k = 4 has 1/9
        z = _z((i1 == 4).mean(), 1 / 9, (1 / 9) * (8 / 9), len(i1))
        assert abs(z) < 4.5, z
        return
    total = sum(lengths.values())
    if len(lengths) == 1:
        assert (length == next(iter(lengths))).all()
        return
    for ln, share in lengths.items():
        p = share / total
        z = _z((length == ln).mean(), p, p * (1 - p), len(length))
        assert abs(z) < 4.5, (ln, z)
    assert set(np.unique(length)) == set(lengths)


# --------------------------------------------------------------------------------------------
# operand faults against a dense reference
# --------------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _vi(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, shape)


def mm_shared():
    w = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", ["b", 2, 4, 3])],
               [_vi("y", ["b", 2, 4, 5])], [nh.from_array(w, "w")])
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 3)).astype(np.float32)
    return m, {"x": x}, lambda item: (x[item].reshape(1, 8, 3), w[None]), None


def mm_batched():
    m = _model([h.make_node("MatMul", ["x", "z"], ["y"], name="mm")], [_vi("x", ["b", 2, 4, 3]), _vi("z", ["b", 2, 3, 5])],
               [_vi("y", ["b", 2, 4, 5])])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 4, 3)).astype(np.float32)
    z = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)
    return m, {"x": x, "z": z}, lambda item: (x[item], z[item]), None


def conv_grouped():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    m = _model([h.make_node("Conv", ["x", "w", "bias"], ["y"], group=2, pads=[1, 1, 1, 1], strides=[2, 2], name="cv")],
               [_vi("x", ["b", 4, 5, 5])], [_vi("y", ["b", 6, 3, 3])],
               [nh.from_array(w, "w"), nh.from_array(bias, "bias")])
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)

    def units(item):  # im2col per group, built with explicit loops: [2, 9, 18] and [2, 18, 3]
        a = np.zeros((2, 9, 18), np.float32)
        for g in range(2):
            for oh in range(3):
                for ow in range(3):
                    for ci in range(2):
                        for ki in range(3):
                            for kj in range(3):
                                ih, iw = oh * 2 - 1 + ki, ow * 2 - 1 + kj
                                if 0 <= ih < 5 and 0 <= iw < 5:
                                    a[g, oh * 3 + ow, ci * 9 + ki * 3 + kj] = x[item, g * 2 + ci, ih, iw]
        b = np.stack([w[g * 3:(g + 1) * 3].reshape(3, 18).T for g in range(2)])
        return a, b
    return m, {"x": x}, units, bias


def _flip(v, bit):
    return (np.array(v, np.float32).view(np.uint32) ^ np.uint32(1 << bit)).view(np.float32)


def dense(a, b, f: V.VariableFault, bias=None):
    """Y[g, m, n] for one item, one scalar operation at a time, with the fault applied."""
    G, M, K = a.shape
    N = b.shape[2]
    y = np.zeros((G, M, N), np.float32)
    with np.errstate(all="ignore"):
        for g in range(G):
            for m in range(M):
                for n in range(N):
                    s = np.float32(0)
                    for k in range(K):
                        av, bv = a[g, m, k], b[g, k, n]
                        if g == f.group and f.kind == "weight" and (k, n) == (f.index0, f.index1) \
                                and f.first <= m < f.end:
                            bv = _flip(bv, f.bit)
                        if g == f.group and f.kind == "input" and (m, k) == (f.index0, f.index1) \
                                and f.first <= n < f.end:
                            av = _flip(av, f.bit)
                        p = np.float32(av * bv)
                        s = p if k == 0 else np.float32(s + p)
                        if g == f.group and f.kind == "psum" and (m, n) == (f.index0, f.index1) and k == f.first:
                            s = _flip(s, f.bit)
                    if bias is not None:
                        s = np.float32(s + bias[g * N + n])
                    y[g, m, n] = s
    return y


def _close(got, want):
    both_nan = np.isnan(got) & np.isnan(want)
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ"
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), "Inf values differ"
    ok = both_nan | inf | (np.abs(got - want) <= RTOL * np.maximum(np.abs(want), 1))
    assert ok.all(), np.max(np.abs(got - want)[~(both_nan | inf)])


@pytest.mark.parametrize("build", [mm_shared, mm_batched, conv_grouped])
@pytest.mark.parametrize("hw", ["ws:2x2", "os:2x3", "is:3x2", "gpu:2x2x2", "equal"])
def test_operand_faults_match_dense_reference(build, hw):
    model, feeds, units, bias = build()
    sess = InjectionSession(campaign_graph(model), "cpu", threads=1)
    clean, plans = sess.clean(feeds)
    reader = V.OperandReader(inject(model, transposed_weights=True).model, "cpu", 1)
    space = V.VariableSpace(plans, V.parse_hw(hw), reader)
    space.prepare(feeds)
    st = space.strata
    rng = np.random.default_rng(7)
    # every kind, with sign, high exponent, low exponent and mantissa bits
    chosen = [s for s in range(len(st)) if st.bit[s] in (31, 30, 24, 3)]
    n_items = len(next(iter(feeds.values())))
    applied = 0
    for s in chosen:
        item = int(rng.integers(0, n_items))
        f = space.describe(s, item, rng)
        out = sess.run(feeds, space.apply(f), plans)[0]
        others = [i for i in range(n_items) if i != item]
        assert np.array_equal(out[others], clean[0][others])
        a, b = units(item)
        want = dense(a, b, f, bias)
        if bias is not None:  # conv: [g, m, n] -> [g*N + n, oh, ow]
            want = want.transpose(0, 2, 1).reshape(out.shape[1:])
        _close(out[item], want.reshape(out.shape[1:]))
        applied += f.end > f.first
    assert applied >= len(chosen) // 3  # most drawn faults were read at least once


def test_importance_sampling_unbiased_under_the_variable_model():
    """RA_1 under ws:2x2 by enumerating every (register, cycle, bit) event of a [2,3] x [3,4]
    MatMul (all equally likely: 24 weight + 24 input + 16 partial-sum register-cycles, x 32 bits),
    against the mean of independent importance-sampling estimates."""
    from onnxft.campaigns import ra
    from onnxft.runtime.data import Dataset

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    model = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", ["b", 2, 3])],
                   [_vi("y", ["b", 8])], [nh.from_array(w, "w")])
    model.graph.node.append(h.make_node("Reshape", ["y0", "shape"], ["y"], name="flat"))
    model.graph.node[0].output[0] = "y0"
    model.graph.initializer.append(nh.from_array(np.array([-1, 8], np.int64), "shape"))
    x = rng.standard_normal((12, 2, 3)).astype(np.float32)
    labels = np.argmax((x @ w).reshape(12, 8), axis=1)
    labels[:2] = (labels[:2] + 1) % 8
    runner = ra.Runner(model, Dataset({"x": x}, labels), batch=12, provider="cpu")
    reader = V.OperandReader(inject(model, transposed_weights=True).model, "cpu", 1)
    hw = V.parse_hw("ws:2x2")
    space = V.VariableSpace(runner.plans[0], hw, reader)
    space.prepare(runner.feeds(0))
    events = []  # (kind, index0, index1, first, end, psum step j) per register-cycle
    for k in range(3):
        for n in range(4):
            for t in range(2):  # weight held while rows 0, 1 stream: a flip at cycle t hits rows t..1
                events.append(("weight", k, n, t, 2))
    for m in range(2):
        for k in range(3):
            for n_star in range(4):  # passed through column tiles {0,1}, {2,3}
                events.append(("input", m, k, n_star, (n_star // 2 + 1) * 2))
    for m in range(2):
        for n in range(4):
            for j in (1, 2):
                events.append(("psum", m, n, j, j + 1))
    assert len(events) == 64
    ok = 0
    for kind, i0, i1, first, end in events:
        for bit in range(32):
            parts = [space.apply(V.VariableFault(0, item, kind, 0, i0, i1, first, end, bit)) for item in range(12)]
            from onnxft.faults.sampling import Faults

            ok += int(runner.run(0, Faults.concat(parts)).sum())
    exact = ok / (64 * 32 * 12)
    assert exact < runner.clean
    ests = [ra.estimate_ra(runner, lambda plans: V.VariableSpace(plans, hw, reader), 1, "is", budget=240,
                           seed=s, pilot=48).value for s in range(25)]
    mean, sd = float(np.mean(ests)), float(np.std(ests, ddof=1))
    z = (mean - exact) / (sd / math.sqrt(len(ests)))
    assert abs(z) < 4.5, f"IS mean {mean:.5f} vs exact {exact:.5f} (z={z:.2f})"


def _qdq_matmul(rng):
    """A QDQ MatMul (uint8 activations [b, 2, 3], int8 per-channel weights [3, 4] with non-zero zero
    points) and its quantisation parameters."""
    wq = rng.integers(-128, 128, (3, 4)).astype(np.int8)
    sw, zw = (rng.random(4) * 0.05 + 0.01).astype(np.float32), rng.integers(-3, 4, 4).astype(np.int8)
    sx, zx = np.float32(0.02), np.uint8(120)
    inits = [nh.from_array(wq, "wq"), nh.from_array(sw, "sw"), nh.from_array(zw, "zw"),
             nh.from_array(np.array(sx), "sx"), nh.from_array(np.array(zx), "zx")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
             h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1, name="dqw"),
             h.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    return _model(nodes, [_vi("x", ["b", 2, 3])], [_vi("y", ["b", 2, 4])], inits), wq, sw, zw, sx, zx


def test_int8_operand_faults_match_integer_reference():
    """QDQ MatMul (uint8 activations, int8 per-channel weights with non-zero zero points): a flip of
    a stored 8-bit operand changes each corrupted product (qa - za)(qb - zb) exactly; the output
    moves by sa sb[n] times the integer change."""
    rng = np.random.default_rng(5)
    model, wq, sw, zw, sx, zx = _qdq_matmul(rng)
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    feeds = {"x": x}
    qx = np.clip(np.rint(x / sx) + int(zx), 0, 255).astype(np.int64)
    sess = InjectionSession(campaign_graph(model, int_widths=(32, 32)), "cpu", threads=1)
    clean, plans = sess.clean(feeds)
    assert plans[[p.site.kind for p in plans].index("gemm")].site.format == "int8"
    reader = V.OperandReader(inject(model, int_widths=(32, 32), transposed_weights=True).model, "cpu", 1)
    for hw in ("ws:2x2", "is:2x2", "equal"):
        space = V.VariableSpace(plans, V.parse_hw(hw), reader)
        space.prepare(feeds)
        st = space.strata
        assert set(st.bit[st.kind == 0].tolist()) == set(range(8))  # 8-bit weights
        draw = np.random.default_rng(3)
        for s in [s for s in range(len(st)) if st.kind[s] in (0, 1)]:
            item = int(draw.integers(0, 3))
            f = space.describe(s, item, draw)
            out = sess.run(feeds, space.apply(f), plans)[0]
            want = clean[0].astype(np.float64).copy()
            qa, qb = qx[item].reshape(2, 3).copy(), wq.astype(np.int64).copy()
            for m in range(2):
                for n in range(4):
                    for k in range(3):
                        a, b = qa[m, k], qb[k, n]
                        if f.kind == "weight" and (k, n) == (f.index0, f.index1) and f.first <= m < f.end:
                            b = ((b & 0xFF) ^ (1 << f.bit))
                            b = b - 256 if b >= 128 else b
                        if f.kind == "input" and (m, k) == (f.index0, f.index1) and f.first <= n < f.end:
                            a = (a & 0xFF) ^ (1 << f.bit)
                        change = (a - int(zx)) * (b - int(zw[n])) - (qa[m, k] - int(zx)) * (qb[k, n] - int(zw[n]))
                        want[item, m, n] += float(sx) * float(sw[n]) * change
            assert np.allclose(out, want, rtol=1e-5, atol=1e-5), (hw, f)


# --------------------------------------------------------------------------------------------
# eval --fault-model variable: several faults per inference, against a dense reference
# --------------------------------------------------------------------------------------------

def dense_many(a, b, faults, bias=None):
    """``dense`` with any number of faults of one product: every operand read XORs the bits of
    every fault whose copy it reads (a bit flipped twice is restored), partial sums flipped in turn."""
    G, M, K = a.shape
    N = b.shape[2]
    y = np.zeros((G, M, N), np.float32)
    # sum of |products| (faulty or fault-free, the larger): what rounding of the sum in another
    # order, or from the fault-free sum's rounding, scales with
    size = np.zeros((G, M, N))
    with np.errstate(all="ignore"):
        for g in range(G):
            for m in range(M):
                for n in range(N):
                    s = np.float32(0)
                    for k in range(K):
                        am, bm = _read_masks(faults, m, n, k, group=g)
                        av = (np.array(a[g, m, k], np.float32).view(np.uint32) ^ np.uint32(am)).view(np.float32)
                        bv = (np.array(b[g, k, n], np.float32).view(np.uint32) ^ np.uint32(bm)).view(np.float32)
                        p = np.float32(av * bv)
                        size[g, m, n] += max(abs(float(p)), abs(float(a[g, m, k]) * float(b[g, k, n])))
                        s = p if k == 0 else np.float32(s + p)
                        for f in faults:
                            # the fault operators leave a non-finite partial sum as it is when one
                            # of its bits is flipped (an exponent flip of a NaN or Inf would make it
                            # finite on hardware): operation-wise behaviour, kept by this model
                            if f.group == g and f.kind == "psum" and (m, n) == (f.index0, f.index1) and k == f.first \
                                    and np.isfinite(s):
                                s = _flip(s, f.bit)
                    if bias is not None:
                        s = np.float32(s + bias[g * N + n])
                    y[g, m, n] = s
    return y, size


def two_layers():
    """x [b, 3, 4] @ w1 [4, 5] -> h @ w2 [5, 6]: the second product reads what faults in the first
    changed. Small integers, so that fault-free sums are exact in any order."""
    rng = np.random.default_rng(11)
    w1 = rng.integers(-3, 4, (4, 5)).astype(np.float32)
    w2 = rng.integers(-3, 4, (5, 6)).astype(np.float32)
    m = _model([h.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                h.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
               [_vi("x", ["b", 3, 4])], [_vi("y", ["b", 3, 6])], [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    x = rng.integers(-3, 4, (6, 3, 4)).astype(np.float32)
    return m, {"x": x}, w1, w2


@pytest.mark.parametrize("hw", ["ws:2x2", "gpu:2x2x2", "equal"])
def test_ber_faults_in_a_chain_match_dense_reference(hw):
    """Several stored-bit flips per inference in two chained MatMuls (sample_ber at a high BER):
    the injection graph fed by ``VariableSpace.inject`` equals the dense reference, which runs
    the first product with its faults and the second on that faulty result with its own; the
    masks from fault-free operands alone would not (the second product's operands changed)."""
    model, feeds, w1, w2 = two_layers()
    sess = InjectionSession(campaign_graph(model), "cpu", threads=1)
    _, plans = sess.clean(feeds)
    reader = V.OperandReader(inject(model, transposed_weights=True).model, "cpu", 1)
    space = V.VariableSpace(plans, V.parse_hw(hw), reader)
    space.prepare(feeds)
    site = {plans[i].site.node: i for i in space.products}
    rng = np.random.default_rng(5)
    ber = 3e-3 if hw != "equal" else 2e-2
    drawn = space.sample_ber(ber, 6, rng)
    assert {f.site for f in drawn} == set(site.values())
    out = sess.run(feeds, space.inject(drawn, feeds, plans), plans)[0]
    naive = sess.run(feeds, space.apply_many(drawn), plans)[0]
    differs = 0
    for item in range(6):
        mine = [f for f in drawn if f.item == item]
        h1 = dense_many(feeds["x"][item][None], w1[None], [f for f in mine if f.site == site["mm1"]])[0][0]
        want, size = dense_many(h1[None], w2[None], [f for f in mine if f.site == site["mm2"]])
        want, size = want[0], size[0]
        # onnxruntime's MatMul sums in another order (and the fault operators start from its
        # fault-free sums): rounding up to a few ulps of the sum of |products|
        # non-finite exactly where the reference is (NaN or Inf: which one may differ when several
        # faults hit one element, as the operators add each fault's change to the output)
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(out[item]), finite), item
        err = np.abs(out[item][finite] - want[finite])
        bad = err > 1e-6 * np.maximum(size[finite], 1)
        assert not bad.any(), (item, err[bad], want[finite][bad], size[finite][bad])
        same_nan = np.isnan(naive[item]) == np.isnan(want)
        differs += not (same_nan.all() and np.allclose(naive[item][~np.isnan(want)], want[~np.isnan(want)],
                                                       rtol=RTOL, atol=RTOL))
    assert differs >= 1  # the fixed point mattered for at least one item


def test_ber_flip_counts_follow_bits_times_residency():
    """At BER b the flips of each kind per item are Binomial(bits x register-cycles, b) (under
    equal: bits x variables); ``variables`` keeps only the chosen kinds."""
    model, feeds, _, _ = two_layers()
    sess = InjectionSession(campaign_graph(model), "cpu", threads=1)
    _, plans = sess.clean(feeds)
    reader = V.OperandReader(inject(model, transposed_weights=True).model, "cpu", 1)
    for hw in ("ws:2x2", "gpu:2x2x2", "equal"):
        space = V.VariableSpace(plans, V.parse_hw(hw), reader)
        rng = np.random.default_rng(1)
        ber, items, reps = 1e-3, 6, 60
        counts = {k: 0 for k in V.VARIABLE_KINDS}
        for _ in range(reps):
            for f in space.sample_ber(ber, items, rng):
                counts[f.kind] += 1
        for kind in V.VARIABLE_KINDS:
            # mm1: M=3, N=5, K=4; mm2: M=3, N=6, K=5, fp32
            positions = sum(V.exposure(V.parse_hw(hw), m, n, k)[kind] * 32 for m, n, k in ((3, 5, 4), (3, 6, 5)))
            n = positions * items * reps
            if n == 0:
                assert counts[kind] == 0
                continue
            z = (counts[kind] - n * ber) / math.sqrt(n * ber * (1 - ber))
            assert abs(z) < 4.5, (hw, kind, counts[kind], n * ber)
    only_w = V.VariableSpace(plans, V.parse_hw("ws:2x2"), reader, ("weight",))
    assert {f.kind for f in only_w.sample_ber(1e-2, items, rng)} == {"weight"}
    assert V.parse_variables("activation,psum") == ("input", "psum")
    assert V.parse_variables("all") == V.VARIABLE_KINDS
    with pytest.raises(ValueError):
        V.parse_variables("weights,bias")


def test_eval_variable_fault_model_end_to_end(tmp_path):
    """``onnxft eval --fault-model variable``: the spec records the model, BER 0 is fault-free,
    weight-only faults hit only weights (fewer flips than all kinds at the same BER), bad options
    are one-line errors."""
    from click.testing import CliRunner

    from onnxft import api
    from onnxft.cli.main import cli
    from onnxft.runtime.data import Dataset

    model, feeds, _, _ = two_layers()
    x = np.random.default_rng(2).integers(-3, 4, (32, 3, 4)).astype(np.float32)
    y0 = np.argmax((x @ np.ones((4, 6), np.float32)).reshape(32, -1), axis=1) % 18
    ds = Dataset({"x": x}, y0)
    kw = dict(bers=(0.0, 1e-3), trials=2, batch=16, provider="cpu", threads=1, metric="sdc")
    everything = api.evaluate(model, ds, fault_model="variable", hw="ws:2x2", **kw)
    weights = api.evaluate(model, ds, fault_model="variable", hw="ws:2x2", variables="weight", **kw)
    assert everything.spec["fault_model"] == "variable" and everything.spec["hw"] == "ws:2x2"
    assert weights.spec["variables"] == ["weight"]
    for r in (everything, weights):
        assert r.points[0].faults_per_item == 0 and r.points[0].sdc == 0
        assert r.points[1].faults_per_item > 0
    # ws: weights are 60 + 90 of the 480 register-cycles per bit (mm1 60/60/45, mm2 90/90/72 with psums)
    assert weights.points[1].faults_per_item < everything.points[1].faults_per_item
    assert everything.points[1].sdc > 0
    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=x, y=y0)
    run = CliRunner().invoke(cli, ["eval", str(path), "--data", str(tmp_path / "d.npz"), "--metric", "sdc",
                                   "--fault-model", "variable", "--hw", "ws:2x2", "--ber", "0,1e-3", "--trials", "1",
                                   "--quiet"])
    assert run.exit_code == 0, run.output
    for bad, msg in ((["--hw", "ws:2x2"], "--hw needs --fault-model variable"),
                     (["--fault-model", "variable", "--hw", "ws:2"], "expected ws:RxC"),
                     (["--fault-model", "variable", "--hw", "ws:2x2", "--variables", "bias"], "--variables")):
        run = CliRunner().invoke(cli, ["eval", str(path), "--data", str(tmp_path / "d.npz"), "--metric", "sdc",
                                       "--quiet"] + bad)
        assert run.exit_code != 0 and msg in run.output and "Traceback" not in run.output, run.output


def test_ra_k2_under_the_variable_model_is_and_mc_agree():
    """RA_2 (two independent variable-level faults, applied together exactly) of two chained
    MatMuls, 1 - SDC - DUE: importance sampling with the product proposal and plain Monte Carlo
    agree within their standard errors."""
    from onnxft.campaigns import ra
    from onnxft.runtime.data import Dataset

    model, feeds, _, _ = two_layers()
    x = np.random.default_rng(8).integers(-3, 4, (32, 3, 4)).astype(np.float32)
    runner = ra.Runner(model, Dataset({"x": x}, None), batch=32, provider="cpu", metric="sdc")
    reader = V.OperandReader(inject(model, transposed_weights=True).model, "cpu", 1)
    hw = V.parse_hw("ws:2x2")

    def space(plans):
        return V.VariableSpace(plans, hw, reader)

    is_ = ra.estimate_ra(runner, space, 2, "is", budget=640, seed=3, pilot=128)
    mc = ra.estimate_ra(runner, space, 2, "mc", budget=1280, seed=4)
    se = [(e.ci[1] - e.ci[0]) / (2 * ra.Z95) for e in (is_, mc)]
    assert 0.05 < mc.value < 0.95  # faults matter here, so agreement means something
    assert abs(is_.value - mc.value) < 4.5 * math.hypot(*se), (is_.value, mc.value, se)
    assert abs(is_.value - (1 - is_.extra["sdc"] - is_.extra["due"])) < 1e-12


def test_fp16_operand_faults_match_dense_reference():
    """fp16 MatMul: stored weights and inputs are 16 bits (strata over bits 0..15, partial sums of
    the float32 accumulator over 32); a flipped binary16 operand changes each corrupted product,
    rounded once to binary16, and the change propagates through the float32 sums. Single faults of
    every kind under ws/gpu/equal, and several per item at a BER, against a dense reference."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((3, 4)).astype(np.float16)
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
               [h.make_tensor_value_info("x", T.FLOAT16, ["b", 2, 3])],
               [h.make_tensor_value_info("y", T.FLOAT16, ["b", 2, 4])], [nh.from_array(w, "w")])
    x = rng.standard_normal((4, 2, 3)).astype(np.float16)
    feeds = {"x": x}
    sess = InjectionSession(campaign_graph(m), "cpu", threads=1)
    clean, plans = sess.clean(feeds)
    assert plans[0].site.format == "fp16"
    reader = V.OperandReader(inject(m, transposed_weights=True).model, "cpu", 1)

    def ref(item, faults):  # binary16 operands, products rounded to binary16, float32 sums
        y = np.zeros((2, 4), np.float32)
        with np.errstate(all="ignore"):
            for r in range(2):
                for n in range(4):
                    s = np.float32(0)
                    for k in range(3):
                        am, bm = _read_masks(faults, r, n, k)
                        av = (np.float16(x[item, r, k]).view(np.uint16) ^ np.uint16(am)).view(np.float16)
                        bv = (np.float16(w[k, n]).view(np.uint16) ^ np.uint16(bm)).view(np.float16)
                        p = np.float32(np.float16(np.float32(av) * np.float32(bv)))
                        s = p if k == 0 else np.float32(s + p)
                        for f in faults:
                            if f.kind == "psum" and (r, n) == (f.index0, f.index1) and k == f.first and np.isfinite(s):
                                s = _flip(s, f.bit)
                    y[r, n] = s
        return y

    def check(out, item, faults, hw=None):
        # ORT's fault-free fp16 MatMul does not round products to binary16: compare the faults'
        # effect, the clean output plus the reference's change, rounded to binary16 (two ulps)
        with np.errstate(all="ignore"):
            want = (clean[0][item].astype(np.float32) + (ref(item, faults) - ref(item, []))).astype(np.float16)
        got = out[item].astype(np.float64)
        want = want.astype(np.float64)
        # non-finite where the reference is (NaN or Inf: which one may differ when several faults
        # hit one element, as the operators add each fault's change to the output; DUE either way)
        fin = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), fin), (faults, got, want)
        if len(faults) == 1:
            assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[np.isinf(want)],
                                                                                   want[np.isinf(want)])
        err = np.abs(got[fin] - want[fin])
        assert (err <= 2e-3 * np.maximum(np.abs(want[fin]), 1)).all(), (hw, faults, got, want)

    for hw in ("ws:2x2", "gpu:2x2x2", "equal"):
        space = V.VariableSpace(plans, V.parse_hw(hw), reader)
        st = space.strata
        assert set(st.bit[st.kind == 0].tolist()) == set(range(16))  # 16-bit weights
        assert set(st.bit[st.kind == 2].tolist()) == (set(range(32)) if hw != "equal" else set())
        assert (st.floating).all()
        space.prepare(feeds)
        draw = np.random.default_rng(3)
        for s in [s for s in range(len(st)) if st.bit[s] in (15, 14, 11, 2, 30)]:
            item = int(draw.integers(0, 4))
            f = space.describe(s, item, draw)
            check(sess.run(feeds, space.apply(f), plans)[0], item, [f])
        drawn = space.sample_ber(2e-2, 4, draw)
        out = sess.run(feeds, space.inject(drawn, feeds, plans), plans)[0]
        assert len(drawn) > 4
        for item in range(4):
            check(out, item, [f for f in drawn if f.item == item], hw)


def test_int8_several_operand_faults_match_integer_reference():
    """Several 8-bit operand flips per item (sample_ber, weights and activations): reads of one
    product by several faults merge (flips XORed on the 8-bit patterns, both operands corrupted at
    once), and the output moves by sa sb[n] times the summed integer change."""
    rng = np.random.default_rng(6)
    model, wq, sw, zw, sx, zx = _qdq_matmul(rng)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    feeds = {"x": x}
    qx = np.clip(np.rint(x / sx) + int(zx), 0, 255).astype(np.int64)
    sess = InjectionSession(campaign_graph(model, int_widths=(32, 32)), "cpu", threads=1)
    clean, plans = sess.clean(feeds)
    reader = V.OperandReader(inject(model, int_widths=(32, 32), transposed_weights=True).model, "cpu", 1)
    merged = 0
    for hw in ("ws:2x2", "equal"):
        space = V.VariableSpace(plans, V.parse_hw(hw), reader, ("weight", "input"))
        space.prepare(feeds)
        drawn = space.sample_ber(0.05 if hw == "ws:2x2" else 0.15, 6, np.random.default_rng(4))
        out = sess.run(feeds, space.inject(drawn, feeds, plans), plans)[0]
        for item in range(6):
            mine = [f for f in drawn if f.item == item]
            want = clean[0][item].astype(np.float64).copy()
            for m in range(2):
                for n in range(4):
                    for k in range(3):
                        am, bm = _read_masks(mine, m, n, k)
                        merged += bool(am and bm)
                        a = (int(qx[item, m, k]) & 0xFF) ^ am
                        b = (int(wq[k, n]) & 0xFF) ^ bm
                        b = b - 256 if b >= 128 else b
                        before = (int(qx[item, m, k]) - int(zx)) * (int(wq[k, n]) - int(zw[n]))
                        change = (a - int(zx)) * (b - int(zw[n])) - before
                        want[m, n] += float(sx) * float(sw[n]) * change
            assert np.allclose(out[item], want, rtol=1e-5, atol=1e-4), (hw, item)
    assert merged > 0  # some product had both operands corrupted
