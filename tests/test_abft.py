"""ABFT pass: fault-free equivalence, single and multiple corrupted outputs detected and corrected,
composition with the inject pass, portability (stock onnxruntime, original opset), block sizes."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import samples
from onnxft.faults.sampling import Faults
from onnxft.graph.roles import PROTECTION, role_of
from onnxft.passes.abft import AbftError, abft, find_gemms
from onnxft.passes.blocksize import candidate_sizes, lb_cost, opt_block_size, p_faulty
from onnxft.passes.inject import SiteSelection, inject
from onnxft.runtime.session import InjectionSession
from models import perturbed, run_on_stock_onnxruntime

BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def session(model, level=BASIC):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, feeds):
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


def vi(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, shape)


def make(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 12)).astype(np.float32)
BIAS = RNG.standard_normal(12).astype(np.float32)


def linear_model(opset=17):
    """torch Linear export: MatMul with a constant weight, then Add of a constant bias."""
    return make([h.make_node("MatMul", ["a", "w"], ["y"], name="mm"),
                 h.make_node("Add", ["y", "bias"], ["z"], name="add"),
                 h.make_node("Relu", ["z"], ["out"], name="relu")],
                [vi("a", ["n", 6, 8])], [vi("out", ["n", 6, 12])],
                [nh.from_array(W, "w"), nh.from_array(BIAS, "bias")], opset)


def attention_model(opset=17):
    """Activation x activation batched product (QK^T-like)."""
    return make([h.make_node("MatMul", ["q", "k"], ["s"], name="qk"),
                 h.make_node("Softmax", ["s"], ["out"], name="sm", axis=-1)],
                [vi("q", ["n", 3, 6, 4]), vi("k", ["n", 3, 4, 10])], [vi("out", ["n", 3, 6, 10])], opset=opset)


def dynamic_attention_model(opset=17):
    """QK^T over a dynamic sequence length: M and N are not static (run-time tau and block grid)."""
    return make([h.make_node("MatMul", ["q", "k"], ["out"], name="qk_dyn")],
                [vi("q", ["n", 2, "s", 4]), vi("k", ["n", 2, 4, "s"])], [vi("out", ["n", 2, "s", "s"])], opset=opset)


def dynamic_av_model(opset=17):
    """Attention x V over a dynamic sequence: M and the inner dimension K are not static (run-time
    checksums of V and a tau from the run-time K); A is a Softmax output (the one-MatMul test)."""
    return make([h.make_node("Softmax", ["scores"], ["p"], name="sm", axis=-1),
                 h.make_node("MatMul", ["p", "v"], ["out"], name="av_dyn")],
                [vi("scores", ["n", 2, "s", "s"]), vi("v", ["n", 2, "s", 4])], [vi("out", ["n", 2, "s", 4])],
                opset=opset)


def dynamic_linear_model(opset=17):
    """torch Linear over a dynamic token axis: M is not static (LB block rows built at run time)."""
    return make([h.make_node("MatMul", ["a", "w"], ["y"], name="mm_dyn"),
                 h.make_node("Add", ["y", "bias"], ["out"], name="add")],
                [vi("a", ["n", "s", 8])], [vi("out", ["n", "s", 12])],
                [nh.from_array(W, "w"), nh.from_array(BIAS, "bias")], opset)


def gemm_model(opset=17):
    """Gemm with transB, alpha, beta and a bias: rank-2 A, so every row is its own GEMM."""
    return make([h.make_node("Gemm", ["a", "w", "c"], ["out"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
                [vi("a", ["n", 8])], [vi("out", ["n", 12])],
                [nh.from_array(W.T.copy(), "w"), nh.from_array(BIAS, "c")], opset)


def feeds_for(model, batch=2, seed=1, s_len=5):
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        shape = [(s_len if d.dim_param == "s" else batch) if d.dim_param else d.dim_value
                 for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def head_model(opset=17):
    """A classifier head as torch exports it: Gemm with transB=1, alpha = beta = 1 (a GEMV per row)."""
    return make([h.make_node("Gemm", ["a", "w", "c"], ["out"], name="head", transB=1)],
                [vi("a", ["n", 8])], [vi("out", ["n", 12])],
                [nh.from_array(W.T.copy(), "w"), nh.from_array(BIAS, "c")], opset)


MODELS = {"linear": linear_model, "attention": attention_model, "gemm": gemm_model,
          "dynamic": dynamic_attention_model, "dynamic_av": dynamic_av_model, "dynamic_linear": dynamic_linear_model}
DYNAMIC = [k for k in MODELS if k.startswith("dynamic")]
# (kind, impl) pairs where a non-global implementation applies: constant weights (--abft-impl)
IMPL_CASES = [("linear", "fused"), ("dynamic_linear", "fused"), ("head", "fused"),
              ("linear", "dup"), ("gemm", "dup"), ("dynamic_linear", "dup"), ("head", "dup")]
IMPL_MODELS = {**MODELS, "head": head_model}


def flags(outs):
    det = [v for k, v in outs.items() if k.endswith(".detected")]
    rec = [v for k, v in outs.items() if k.endswith(".recomputed")]
    return bool(det[0]), int(rec[0])


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("scheme", ["lb", "standard"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fault_free_identical_and_portable(kind, scheme, opset):
    model = MODELS[kind](opset)
    r = abft(model, scheme=scheme, block_size=4)
    assert [o.version for o in r.model.opset_import if o.domain == ""] == [opset]
    onnx.checker.check_model(r.model, full_check=True)
    feeds = feeds_for(model)
    want = run(model, feeds)
    got = run(r.model, feeds)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)  # else branch = Identity: bit-identical
    assert len(r.details["gemms"]) == 1
    assert r.details["gemms"][0]["scheme"] == scheme and r.details["gemms"][0]["fallback"] is None
    inserted = [n for n in r.model.graph.node if n.name.startswith("onnxft.abft")]
    assert inserted and all(role_of(n) == PROTECTION for n in inserted)
    assert not any(n.name.startswith("onnxft.abft") for n in model.graph.node)  # input untouched


VALUES = [np.nan, np.inf, -np.inf, 3e38, 1e3, 0.5]


@pytest.mark.parametrize("kind,scheme,impl", [(k, s, "global") for k in MODELS for s in ("lb", "standard")]
                         + [(k, "lb", i) for k, i in IMPL_CASES])
def test_single_corrupted_element_is_corrected(kind, scheme, impl):
    model = IMPL_MODELS[kind]()
    r = abft(model, scheme=scheme, block_size=4, expose_flags=True, impl=impl)
    assert r.details["gemms"][0]["impl"] == impl
    bad = perturbed(r.model)
    feeds = feeds_for(model)
    clean = run(model, feeds)
    out_name = model.graph.output[0].name
    y_shape = run(r.model, feeds)[out_name].shape
    plan = r.details["gemms"][0]
    for value in VALUES:
        for flat in (0, int(np.prod(y_shape)) - 1, int(np.prod(y_shape)) // 3):
            delta = np.zeros(y_shape, np.float32)
            delta.flat[flat] = value
            got = run(bad, {**feeds, "delta": delta})
            det, rec = flags(got)
            assert det, (value, flat)
            np.testing.assert_allclose(got[out_name], clean[out_name], rtol=1e-5, atol=1e-6)
            if plan["scheme"] == "standard":
                assert rec == 1 or (plan["rowwise"] and rec == y_shape[-1])
            else:
                assert rec == 16  # one 4 x 4 block


@pytest.mark.parametrize("kind,impl", [(k, "global") for k in MODELS] + IMPL_CASES)
def test_several_errors(kind, impl):
    model = IMPL_MODELS[kind]()
    feeds = feeds_for(model)
    clean = run(model, feeds)
    out_name = model.graph.output[0].name
    lb = abft(model, scheme="lb", block_size=4, expose_flags=True, impl=impl)
    assert lb.details["gemms"][0]["impl"] == impl
    std = abft(model, scheme="standard", expose_flags=True)
    lb_blocks = lb.details["gemms"][0]["scheme"] == "lb"
    y_shape = run(lb.model, feeds)[out_name].shape
    delta = np.zeros(y_shape, np.float32)
    first = (0,) * (len(y_shape) - 2)
    rowwise = kind in ("gemm", "head")  # every row is its own GEMM
    rows = [0, 0] if rowwise else [0, 1, 3]
    cols = [0, 2] if rowwise else [0, 2, 3]
    for i, j, v in zip(rows, cols, [7.0, np.inf, -2.0]):
        delta[first + (i, j)] = v
    # LB: all errors in one 4 x 4 block -> that block is recomputed
    got = run(perturbed(lb.model), {**feeds, "delta": delta})
    if lb_blocks:
        assert flags(got) == (True, 16)
    np.testing.assert_allclose(got[out_name], clean[out_name], rtol=1e-5, atol=1e-6)
    # standard: several errors in one matrix -> that matrix is recomputed
    got = run(perturbed(std.model), {**feeds, "delta": delta})
    plan = std.details["gemms"][0]
    assert flags(got) == (True, (1 if plan["rowwise"] else y_shape[-2]) * y_shape[-1])
    np.testing.assert_allclose(got[out_name], clean[out_name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["global", "fused", "dup"])
def test_errors_in_two_blocks_and_two_items(impl):
    model = linear_model()
    r = abft(model, scheme="lb", block_size=4, expose_flags=True, impl=impl)
    feeds = feeds_for(model, batch=3)
    clean = run(model, feeds)
    delta = np.zeros((3, 6, 12), np.float32)
    delta[0, 5, 11] = 100.0  # edge block (rows 4..5, cols 8..11): clamped indices
    delta[2, 0, 5] = -1e20
    got = run(perturbed(r.model), {**feeds, "delta": delta})
    assert flags(got) == (True, 32)
    np.testing.assert_allclose(got["out"], clean["out"], rtol=1e-5, atol=1e-6)


def test_find_gemms_and_skips():
    m = make([h.make_node("MatMul", ["a", "v"], ["y"], name="mv"),
              h.make_node("MatMul", ["a2", "w"], ["y2"], name="mm")],
             [vi("a", [3, 8]), vi("v", [8]), vi("a2", [2, 3, 8])], [vi("y", [3]), vi("y2", [2, 3, 12])],
             [nh.from_array(W, "w")])
    sites = {s.name: s for s in find_gemms(m)}
    assert "vector" in sites["mv"].skip
    assert sites["mm"].skip is None and sites["mm"].b_constant and (sites["mm"].M, sites["mm"].N, sites["mm"].K) == (3, 12, 8)
    r = abft(m)
    assert [name for name, _ in r.skipped] == ["mv"] and len(r.details["gemms"]) == 1
    with pytest.raises(AbftError):
        abft(m, scheme="nope")
    with pytest.raises(AbftError):
        abft(m, gemms=["missing"])
    assert abft(m, names="^nothing$").details["gemms"] == []


# ---------------------------------------------------------------------------------------------
# samples


X = None


def images(n):
    global X
    if X is None:
        X = np.load(samples.sample_data_path())["x"]
    return X[:n]


@pytest.mark.parametrize("name", ["vit", "vit_int8"])
def test_samples_fault_free(name, tmp_path):
    model = onnx.load(samples.sample_model(name)["path"])
    x = images(16)
    want = run(model, {"x": x})["logits"]
    for scheme in ("lb", "standard"):
        r = abft(model, scheme=scheme)
        assert len(r.details["gemms"]) == 37 and not r.skipped
        onnx.checker.check_model(r.model, full_check=True)
        got = run(r.model, {"x": x})["logits"]
        if name == "vit_int8":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # stock onnxruntime in a fresh interpreter that cannot import onnxft
    got = run_on_stock_onnxruntime(r.model, {"x": x}, tmp_path, level="basic")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_inject_into_hardened_vit():
    """A sampled-style single fault at a protected MatMul site of the real injection graph: the
    hardened output equals the fault-free output; inject skips the protection nodes."""
    model = onnx.load(samples.sample_model("vit")["path"])
    hardened = abft(model, scheme="lb", precision="fp32").model  # (tf32's looser bound misses some sign flips)
    inj = inject(hardened)
    assert not any(s.node.startswith("onnxft.abft") for s in InjectionSession(inj.model, "cpu").table.sites)
    with_prot = inject(hardened, SiteSelection(include_protection=True))
    assert any(s.node.startswith("onnxft.abft") for s in InjectionSession(with_prot.model, "cpu").table.sites)
    plain = inject(model)
    sess = InjectionSession(inj.model, "cpu", threads=1)
    x = images(2)
    clean, plans = sess.clean({"x": x})
    np.testing.assert_allclose(clean[0], run(model, {"x": x})["logits"], rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(0)
    sites = [i for i, s in enumerate(sess.table.sites) if s.kind == "gemm" and s.op_type in ("MatMul", "Gemm")]
    assert len(sites) == 37
    for i in rng.choice(sites, 6, replace=False):
        plan = plans[i]
        element = int(rng.integers(plan.elements))
        for step, bit in ((2 * plan.k - 2, 30), (int(rng.integers(plan.k)), 31)):  # final sum; a product
            f = Faults(np.array([i]), np.array([1]), np.array([element]), np.array([step]), np.array([bit]))
            out = sess.run({"x": x}, f)
            np.testing.assert_allclose(out[0], clean[0], rtol=1e-5, atol=1e-5)
    # the same fault in the unprotected model changes the output
    ps = InjectionSession(plain.model, "cpu", threads=1)
    c0, _ = ps.clean({"x": x})
    j = next(k for k, s in enumerate(ps.table.sites) if s.node == "/blocks/blocks.0/attn/qkv/MatMul")
    f = Faults(np.array([j]), np.array([1]), np.array([777]), np.array([2 * 128 - 2]), np.array([30]))
    assert np.abs(ps.run({"x": x}, f)[0] - c0[0]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# block size


def test_opt_block_size_trends_and_brute_force():
    sizes = [opt_block_size(197, 768, 768, ber)[0] for ber in (1e-11, 1e-10, 1e-9, 1e-8, 1e-7)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and sizes[0] > sizes[-1]
    # saturation: when every block is almost surely faulty, one block (= recompute all) is cheapest
    assert opt_block_size(197, 768, 768, 1e-6)[0] == 768
    for M, N, K, ber in [(7, 5, 3, 1e-4), (16, 12, 9, 1e-6), (30, 20, 10, 1e-3)]:
        allb = range(1, max(M, N) + 1)
        b, cost = opt_block_size(M, N, K, ber, candidates=allb)
        assert cost == min(lb_cost(M, N, K, ber, x)["total"] for x in allb)
        assert b in allb


def test_expected_faulty_blocks_matches_simulation():
    """The cost model's expected faulty-block count against a Monte Carlo draw of faulty operations."""
    M, N, K, b, ber, bits = 12, 10, 6, 4, 2e-5, 32
    rng = np.random.default_rng(3)
    n_out = M * N
    per_out = 2 * K * bits
    trials = 4000
    counts = []
    for _ in range(trials):
        hit = rng.random((M, N)) < p_faulty(2 * K, ber, bits)
        blocks = {(i // b, j // b) for i, j in zip(*np.nonzero(hit))}
        counts.append(len(blocks))
    model = lb_cost(M, N, K, ber, b, bits)["expected_faulty_blocks"]
    assert abs(np.mean(counts) - model) < 4 * np.std(counts) / np.sqrt(trials) + 1e-3
    assert n_out * per_out > 0 and 1 in candidate_sizes(M, N)


def test_calibration_and_no_false_detection():
    """Calibrate on 250 images, then no detection on 500 others, fp32 and int8, with the
    calibrated thresholds and with the rounding bound. (All 2000 bundled images:
    benchmarks/abft_false_alarms.py, which takes about 90 s on 2 shared cores.)"""
    from onnxft.campaigns.calibrate_abft import calibrate_abft

    x = images(750)
    for name in ("vit", "vit_int8"):
        model = onnx.load(samples.sample_model(name)["path"])
        cal = calibrate_abft(model, [{"x": x[500:750]}], precision="fp32")
        assert len(cal) == 37
        for c in cal.values():
            assert 0 < c["max_ratio"] < c["tau"] <= c["tau_bound"]
        for thresholds in (cal, None):
            r = abft(model, scheme="lb", thresholds=thresholds, expose_flags=True, precision="fp32")
            if thresholds:
                assert {g["tau_source"] for g in r.details["gemms"]} == {"calibrated"}
            s = session(r.model)
            names = [o.name for o in s.get_outputs()]
            det = [i for i, n in enumerate(names) if n.endswith(".detected")]
            for i in range(0, 500, 250):
                outs = s.run(None, {"x": x[i:i + 250]})
                assert not any(bool(outs[j]) for j in det), (name, thresholds is not None, i)


def test_dynamic_n_threshold_is_the_bound_at_run_time():
    model = dynamic_attention_model()
    r = abft(model, expose_flags=True)
    assert r.details["gemms"][0]["tau_source"].startswith("rounding bound (run time")
    for s_len in (3, 40):
        q = np.random.default_rng(s_len).standard_normal((2, 2, s_len, 4)).astype(np.float32) * 100
        k = np.random.default_rng(s_len + 1).standard_normal((2, 2, 4, s_len)).astype(np.float32)
        assert flags(run(r.model, {"q": q, "k": k})) == (False, 0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_sec_corrects_one_error_and_leaves_several(kind):
    """``sec`` (single-error correction only, the seed paper's baseline): one error is corrected
    like ``standard`` does; several errors in one matrix are detected and left as they are."""
    model = MODELS[kind]()
    feeds = feeds_for(model)
    clean = run(model, feeds)
    out_name = model.graph.output[0].name
    r = abft(model, scheme="sec", expose_flags=True)
    assert r.details["gemms"][0]["scheme"] == "sec"
    bad = perturbed(r.model)
    y_shape = run(r.model, feeds)[out_name].shape
    one = np.zeros(y_shape, np.float32)
    one.flat[int(np.prod(y_shape)) // 3] = 1e3
    got = run(bad, {**feeds, "delta": one})
    det, rec = flags(got)
    assert det and rec == 1
    np.testing.assert_allclose(got[out_name], clean[out_name], rtol=1e-5, atol=1e-6)
    several = np.zeros(y_shape, np.float32)
    first = (0,) * (len(y_shape) - 2)
    rows = [0, 0] if kind == "gemm" else [0, 1]
    for i, j in zip(rows, [0, 2]):
        several[first + (i, j)] = 5.0
    got = run(bad, {**feeds, "delta": several})
    assert flags(got) == (True, 0)
    changed = ~np.isclose(got[out_name], clean[out_name], rtol=1e-5, atol=1e-6)
    touched_rows = (several != 0).any(axis=-1, keepdims=True)  # (a Softmax after the GEMM mixes a row)
    assert changed.any() and not (changed & ~touched_rows).any()  # left as it is, nothing else touched


def conv_model(opset=17, group=1):
    """A Conv with bias (padding and stride, so border positions see fewer terms), then Relu."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 4 // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32) if group == 1 else None
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    inits = [nh.from_array(w, "w")] + ([nh.from_array(b, "b")] if b is not None else [])
    return make([h.make_node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2], group=group),
                 h.make_node("Relu", ["y"], ["out"], name="relu")],
                [vi("x", ["n", 4, 7, 7])], [vi("out", ["n", 5, 4, 4])], inits, opset)


@pytest.mark.parametrize("opset", [13, 21])
def test_conv_fault_free_identical_and_errors_recomputed(opset):
    model = conv_model(opset)
    r = abft(model, scheme="lb", expose_flags=True)
    onnx.checker.check_model(r.model, full_check=True)
    plan = r.details["convs"]
    assert [(c["name"], c["M"], c["N"], c["K"], c["scheme"]) for c in plan] == [("conv", 16, 5, 36, "recompute")]
    feeds = {"x": np.random.default_rng(4).standard_normal((3, 4, 7, 7)).astype(np.float32)}
    clean = run(model, feeds)["out"]
    got = run(r.model, feeds)
    np.testing.assert_array_equal(got["out"], clean)
    assert flags(got) == (False, 0)
    # the test sees any corruption of the Conv's result (stand-in for a fault): one element, or
    # several in two items; the flagged items are recomputed, the third is left alone
    m = perturbed(r.model, "c000")
    for value in VALUES:
        delta = np.zeros((3, 5, 4, 4), np.float32)
        delta[0, 4, 3, 3] = value
        delta[2, 0, 0, 1] = value
        delta[2, 3, 2, 0] = -value
        got = run(m, {**feeds, "delta": delta})
        assert flags(got) == (True, 2 * 5 * 16), value
        np.testing.assert_allclose(got["out"], clean, rtol=1e-5, atol=1e-6)


def conv_nd_reference(x, w, b, group, pad):
    """Grouped N-D convolution, stride 1, symmetric zero padding ``pad``, in float64 (numpy)."""
    nd = w.ndim - 2
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pad, pad)] * nd)
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=tuple(range(2, 2 + nd)))
    cin_g, cout_g = w.shape[1], w.shape[0] // group
    outs = []
    for g in range(group):
        xs = win[:, g * cin_g:(g + 1) * cin_g]  # [n, cin_g, spatial..., kernel...]
        ws = w[g * cout_g:(g + 1) * cout_g].astype(np.float64)  # [cout_g, cin_g, kernel...]
        letters = "defg"[:nd]
        outs.append(np.einsum(f"nc{'pqr'[:nd]}{letters},oc{letters}->no{'pqr'[:nd]}", xs, ws))
    y = np.concatenate(outs, axis=1)
    return y + b.reshape(1, -1, *([1] * nd))


CONV_FORMS = {"grouped": (4, 6, 2, [3, 3]), "depthwise": (8, 8, 8, [3, 3]), "depthwise_x2_1d": (4, 8, 4, [3]),
              "conv3d": (4, 6, 1, [3, 3, 3]), "grouped3d": (6, 6, 3, [2, 3, 3])}


@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_forms_detect_and_recover(form):
    """Grouped, depthwise, 1-D and 3-D convolutions: one channel-sum test per group; fault-free
    outputs bit-identical, corrupted items detected and recomputed (numpy reference)."""
    cin, cout, group, ks = CONV_FORMS[form]
    rng = np.random.default_rng(len(form))
    w = rng.standard_normal((cout, cin // group, *ks)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    sp = [6] * len(ks)
    model = make([h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, pads=[1] * 2 * len(ks)),
                  h.make_node("Relu", ["y"], ["out"], name="relu")],
                 [vi("x", ["n", cin, *sp])], [vi("out", ["n", cout] + [None] * len(ks))],
                 [nh.from_array(w, "w"), nh.from_array(b, "b")])
    # (fp32: onnxruntime's CPU arithmetic; the default tf32 bound lets an error of 0.5 pass here)
    r = abft(model, scheme="lb", expose_flags=True, precision="fp32")
    onnx.checker.check_model(r.model, full_check=True)
    (plan,) = r.details["convs"]
    assert (plan["group"], plan["N"], plan["K"]) == (group, cout // group, cin // group * int(np.prod(ks)))
    x = rng.standard_normal((3, cin, *sp)).astype(np.float32)
    clean = run(model, {"x": x})["out"]
    np.testing.assert_allclose(clean, np.maximum(conv_nd_reference(x, w, b, group, 1), 0), rtol=1e-5, atol=1e-5)
    got = run(r.model, {"x": x})
    np.testing.assert_array_equal(got["out"], clean)
    assert flags(got) == (False, 0)
    m = perturbed(r.model, "c000")
    y_shape = (3, cout, *clean.shape[2:])
    for value in (np.nan, -np.inf, 1e3, 0.5):
        delta = np.zeros(y_shape, np.float32)
        delta[(0, cout - 1) + (0,) * len(ks)] = value  # one error in item 0
        delta[(2, 0) + tuple(d - 1 for d in y_shape[2:])] = value  # several in item 2
        delta[(2, cout // 2) + (1,) * len(ks)] = -value
        got = run(m, {"x": x, "delta": delta})
        assert flags(got) == (True, 2 * int(np.prod(y_shape[1:]))), (form, value)
        np.testing.assert_allclose(got["out"], clean, rtol=1e-5, atol=1e-6)


def test_nhwc_transpose_conv_transpose_protected():
    """The NHWC pattern of tf2onnx exports: Transpose -> Conv (weight a Transpose of an HWIO
    constant) -> Transpose. The Conv is protected; fault-free output bit-identical; a corrupted
    output is recovered."""
    rng = np.random.default_rng(7)
    w_hwio = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    model = make([h.make_node("Transpose", ["x"], ["xt"], name="to_nchw", perm=[0, 3, 1, 2]),
                  h.make_node("Transpose", ["w_hwio"], ["w"], name="w_to_oihw", perm=[3, 2, 0, 1]),
                  h.make_node("Conv", ["xt", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
                  h.make_node("Transpose", ["y"], ["out"], name="to_nhwc", perm=[0, 2, 3, 1])],
                 [vi("x", ["n", 6, 6, 4])], [vi("out", ["n", 6, 6, 5])], [nh.from_array(w_hwio, "w_hwio")])
    r = abft(model, expose_flags=True)
    assert [c["name"] for c in r.details["convs"]] == ["conv"] and not r.skipped
    onnx.checker.check_model(r.model, full_check=True)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    clean = run(model, {"x": x})["out"]
    ref = conv_nd_reference(x.transpose(0, 3, 1, 2), w_hwio.transpose(3, 2, 0, 1), np.zeros(5, np.float32), 1, 1)
    np.testing.assert_allclose(clean, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    got = run(r.model, {"x": x})
    np.testing.assert_array_equal(got["out"], clean)
    m = perturbed(r.model, "c000")
    delta = np.zeros((2, 5, 6, 6), np.float32)
    delta[1, 2, 3, 4] = 1e4
    got = run(m, {"x": x, "delta": delta})
    assert flags(got) == (True, 5 * 36)
    np.testing.assert_allclose(got["out"], clean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# run-time shapes: LB-ABFT with dynamic M, N and K


@pytest.mark.parametrize("kind", DYNAMIC)
def test_dynamic_shapes_keep_lb_at_two_run_time_shapes(kind):
    """Dynamic batch, token and sequence axes: LB-ABFT is built (no fallback), fault-free outputs
    are bit-identical at two run-time shapes, and single and multiple corrupted outputs are
    detected and recovered against a numpy reference of the product."""
    model = MODELS[kind]()
    r = abft(model, scheme="lb", block_size=4, expose_flags=True)
    plan = r.details["gemms"][0]
    assert plan["scheme"] == "lb" and plan["fallback"] is None
    onnx.checker.check_model(r.model, full_check=True)
    bad = perturbed(r.model)
    out_name = model.graph.output[0].name
    for batch, s_len in ((2, 5), (3, 11)):
        feeds = feeds_for(model, batch=batch, s_len=s_len)
        want = run(model, feeds)[out_name]
        got = run(r.model, feeds)
        np.testing.assert_array_equal(got[out_name], want)
        assert flags(got) == (False, 0)
        ref = numpy_reference(kind, feeds)
        np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-5)
        y_shape = want.shape
        rng = np.random.default_rng(s_len)
        # one error anywhere (edge blocks included), then several in different blocks and items
        for n_err in (1, 4):
            delta = np.zeros(y_shape, np.float32)
            for _ in range(n_err):
                delta[tuple(int(rng.integers(d)) for d in y_shape)] = rng.choice([np.inf, -1e4, 3.0, np.nan])
            got = run(bad, {**feeds, "delta": delta})
            det, rec = flags(got)
            assert det and 16 <= rec <= 16 * n_err, (s_len, n_err, rec)
            np.testing.assert_allclose(got[out_name], ref, rtol=1e-5, atol=1e-5)


def numpy_reference(kind, feeds):
    if kind == "dynamic":
        return feeds["q"].astype(np.float64) @ feeds["k"]
    if kind == "dynamic_av":
        s = feeds["scores"].astype(np.float64)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ feeds["v"]
    return feeds["a"].astype(np.float64) @ W + BIAS


def test_runtime_tau_is_the_static_bound():
    """The run-time threshold of a unit (a graph expression of the run-time K and N) is
    ``passes.thresholds.tau_bound`` at those sizes, for float32 and float16 units: one formula."""
    from onnxft.graph.checksums import Nodes
    from onnxft.passes.abft import _runtime_tau
    from onnxft.passes.thresholds import tau_bound, unit_precision

    for fp16 in (False, True):
        prec = unit_precision("tf32", fp16)
        nb = Nodes("t", 17)
        out = _runtime_tau(nb, prec, 2, True, "k", "n")
        g = h.make_graph(nb.nodes, "g", [vi("k", [1]), vi("n", [1])], [vi(out, [1])], nb.initializers)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
        for k, n in ((4, 4), (197, 64), (4096, 4096), (50000, 10)):
            got = run(m, {"k": np.float32([k]), "n": np.float32([n])})[out][0]
            want = tau_bound(k, n, prec, 2, True)
            assert got == pytest.approx(want, rel=1e-5) or (np.isinf(got) and np.isinf(want))


def test_block_size_from_representative_shapes():
    """A dynamic GEMM's block size is Algorithm 2's at the representative shape (given, or one
    calibration batch in harden), and the plan records the shape it was chosen at."""
    model = dynamic_linear_model()
    e = abft(model, scheme="lb", ber=1e-8, shapes={"a": [8, 197, 8]}).details["gemms"][0]
    assert e["shape_for_costs"] == {"rows": 197, "N": 12, "K": 8, "source": "representative shapes"}
    assert e["block_size"] == opt_block_size(197, 12, 8, 1e-8)[0]
    e = abft(model, scheme="lb", ber=1e-8).details["gemms"][0]
    assert e["shape_for_costs"]["rows"] == 256 and "unknown" in e["shape_for_costs"]["source"]
    with pytest.raises(AbftError):
        abft(model, shapes={"a": [8, 197]})


# ---------------------------------------------------------------------------------------------
# float16


def fp16_model():
    """A float16 Linear (MatMul + bias over a dynamic token axis) then attention-like products:
    scores = A @ A^T, P = Softmax(scores), P @ A, all in float16."""
    w = (RNG.standard_normal((16, 24)) * 0.1).astype(np.float16)
    b = (RNG.standard_normal(24) * 0.1).astype(np.float16)
    f16 = lambda name, shape: h.make_tensor_value_info(name, T.FLOAT16, shape)  # noqa: E731
    return make([h.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
                 h.make_node("Add", ["y", "b"], ["z"], name="fc_bias"),
                 h.make_node("Transpose", ["z"], ["zt"], name="t", perm=[0, 2, 1]),
                 h.make_node("MatMul", ["z", "zt"], ["s"], name="qk"),
                 h.make_node("Softmax", ["s"], ["p"], name="sm", axis=-1),
                 h.make_node("MatMul", ["p", "z"], ["out"], name="av")],
                [f16("x", ["n", "s", 16])], [f16("out", ["n", "s", 24])],
                [nh.from_array(w, "w"), nh.from_array(b, "b")])


def test_fp16_products_protected_without_false_alarms():
    """float16 GEMMs (constant and activation B, dynamic M, N and K): checked in float32 with the
    float16 rounding bound; no false alarm on random inputs at several shapes, fault-free outputs
    within float16 rounding of the original's, and a corrupted output of each unit recovered."""
    model = fp16_model()
    r = abft(model, scheme="lb", block_size=4, expose_flags=True)
    onnx.checker.check_model(r.model, full_check=True)
    plan = r.details["gemms"]
    assert [g["name"] for g in plan] == ["fc", "qk", "av"] and not r.skipped
    assert all(g["scheme"] == "lb" and "float16" in g["tau_source"] or "run time" in g["tau_source"] for g in plan)
    s_clean, s_hard = session(model), session(r.model)
    names = [o.name for o in s_hard.get_outputs()]
    rng = np.random.default_rng(5)
    for trial in range(12):
        s_len = int(rng.integers(1, 40))
        x = (rng.standard_normal((2, s_len, 16)) * rng.choice([0.1, 0.5, 1.0])).astype(np.float16)
        want = s_clean.run(None, {"x": x})[0]
        got = dict(zip(names, s_hard.run(None, {"x": x})))
        # (not bit-identical: onnxruntime's CPU provider runs float16 MatMul/Add in float32 and drops
        # the float16 rounding between two such nodes unless another node reads the tensor, as the
        # check does; the difference is float16 rounding)
        top = float(np.abs(want.astype(np.float32)).max())
        np.testing.assert_allclose(got["out"].astype(np.float32), want.astype(np.float32), atol=4e-3 * top, rtol=0)
        assert not any(bool(v) for k, v in got.items() if k.endswith(".detected")), trial
    x = rng.standard_normal((2, 9, 16)).astype(np.float16)
    want = s_clean.run(None, {"x": x})[0]
    for unit, shape in ((0, (2, 9, 24)), (1, (2, 9, 9)), (2, (2, 9, 24))):
        bad = perturbed(r.model, unit)
        bad.graph.input[-1].CopyFrom(h.make_tensor_value_info("delta", T.FLOAT16, None))
        delta = np.zeros(shape, np.float16)
        delta[1, 8, 3] = 1000
        delta[0, 0, 0] = -np.inf
        got = run(bad, {"x": x, "delta": delta})
        assert bool(got[f"onnxft.abft.{plan[unit]['name']}.detected"])
        np.testing.assert_allclose(got["out"].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_gemms_in_subgraphs_listed_as_skipped():
    """A MatMul inside an If branch is not protected (checks are built in the main graph) and is
    listed with that reason; the main graph's MatMul is protected."""
    then_g = h.make_graph([h.make_node("MatMul", ["y", "w"], ["t"], name="inner_mm")], "then", [], [vi("t", [2, 12])])
    else_g = h.make_graph([h.make_node("Identity", ["y"], ["e"], name="inner_id")], "else", [], [vi("e", [2, 8])])
    wsq = RNG.standard_normal((8, 8)).astype(np.float32)
    model = make([h.make_node("MatMul", ["a", "wsq"], ["y"], name="outer_mm"),
                  h.make_node("If", ["c"], ["out"], name="branch", then_branch=then_g, else_branch=else_g)],
                 [vi("a", [2, 8]), h.make_tensor_value_info("c", T.BOOL, [])], [vi("out", None)],
                 [nh.from_array(wsq, "wsq"), nh.from_array(W, "w")])
    r = abft(model)
    assert [g["name"] for g in r.details["gemms"]] == ["outer_mm"]
    assert [(n, "If body" in why) for n, why in r.skipped] == [("inner_mm", True)]


def test_fp16_conv_protected_without_false_alarms():
    """A float16 grouped Conv: checked in float32 with the float16 bound; no false alarm on random
    inputs, output equal to the original's, a corrupted item recovered."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((6, 2, 3, 3)) * 0.3).astype(np.float16)
    b = rng.standard_normal(6).astype(np.float16)
    f16 = lambda name, shape: h.make_tensor_value_info(name, T.FLOAT16, shape)  # noqa: E731
    model = make([h.make_node("Conv", ["x", "w", "b"], ["out"], name="conv", group=2, pads=[1, 1, 1, 1])],
                 [f16("x", ["n", 4, "h", "w"])], [f16("out", ["n", 6, "h", "w"])],
                 [nh.from_array(w, "w"), nh.from_array(b, "b")])
    r = abft(model, expose_flags=True)
    onnx.checker.check_model(r.model, full_check=True)
    assert "float16" in r.details["convs"][0]["tau_source"]
    s_clean, s_hard = session(model), session(r.model)
    names = [o.name for o in s_hard.get_outputs()]
    for trial in range(8):
        x = (rng.standard_normal((2, 4, 5 + trial, 7)) * rng.choice([0.1, 1.0, 10.0])).astype(np.float16)
        got = dict(zip(names, s_hard.run(None, {"x": x})))
        np.testing.assert_array_equal(got["out"], s_clean.run(None, {"x": x})[0])
        assert not bool(got["onnxft.abft.conv.detected"]), trial
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float16)
    m = perturbed(r.model, "c000", T.FLOAT16)
    delta = np.zeros((2, 6, 5, 5), np.float16)
    delta[1, 4, 2, 2] = 100
    got = run(m, {"x": x, "delta": delta})
    assert flags(got) == (True, 6 * 25)
    want = s_clean.run(None, {"x": x})[0].astype(np.float32)
    np.testing.assert_allclose(got["out"].astype(np.float32), want, rtol=0, atol=4e-3 * np.abs(want).max())


@pytest.mark.parametrize("group,dtype", [(2, np.float32), (4, np.float32), (2, np.float16)])
def test_grouped_conv_absorbs_batchnorm_scale_and_residual(group, dtype):
    """Grouped and depthwise Convs (float32 and float16) absorb a BatchNormalization, a per-channel
    Mul and a residual Add (ConvSite.post, per-group channel sums): fault-free outputs equal the
    original's with no alarm, and a corrupted chain end is detected and recomputed through the
    chain."""
    rng = np.random.default_rng(group)
    c = 4
    elem = T.FLOAT16 if dtype == np.float16 else T.FLOAT
    tv = lambda name, shape: h.make_tensor_value_info(name, elem, shape)  # noqa: E731
    arr = lambda v, name: nh.from_array(np.asarray(v).astype(dtype), name)  # noqa: E731
    inits = [arr(rng.standard_normal((c, c // group, 3, 3)) * 0.3, "w"), arr(rng.standard_normal(c), "b"),
             arr(rng.uniform(0.5, 2, c), "gamma"), arr(rng.standard_normal(c), "beta"),
             arr(rng.standard_normal(c) * 0.1, "mean"), arr(rng.uniform(0.5, 2, c), "var"),
             arr(rng.uniform(0.5, 2, (1, c, 1, 1)), "mulc")]
    model = make([h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1]),
                  h.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
                  h.make_node("Mul", ["bn", "mulc"], ["sc"], name="mul"),
                  h.make_node("Add", ["sc", "x"], ["res"], name="add"),
                  h.make_node("Relu", ["res"], ["out"], name="relu")],
                 [tv("x", ["n", c, 6, 6])], [tv("out", ["n", c, 6, 6])], inits)
    r = abft(model, expose_flags=True, precision="fp32")
    onnx.checker.check_model(r.model, full_check=True)
    (plan,) = r.details["convs"]
    assert plan["absorbed"] == ["bn", "mul", "add"] and plan["group"] == group
    assert plan["precision"] == ("fp16" if dtype == np.float16 else "fp32")
    w = nh.to_array(inits[0]).astype(np.float32)
    assert not any(i.name != "w" and tuple(i.dims) == w.shape and np.array_equal(nh.to_array(i).astype(np.float32), w)
                   for i in r.model.graph.initializer)  # (the recovery reads the model's weight: no copy)
    s_clean, s_hard = session(model), session(r.model)
    names = [o.name for o in s_hard.get_outputs()]
    for trial in range(4):
        x = (rng.standard_normal((3, c, 6, 6)) * rng.choice([0.1, 1.0, 10.0])).astype(dtype)
        got = dict(zip(names, s_hard.run(None, {"x": x})))
        np.testing.assert_array_equal(got["out"], s_clean.run(None, {"x": x})[0])
        assert flags(got) == (False, 0), trial
    raw = "onnxft.abft.c000/unchecked"
    assert next(n for n in r.model.graph.node if raw in n.output).name == "add"  # the check reads the chain's end
    m = perturbed(r.model, "c000", elem)
    x = rng.standard_normal((3, c, 6, 6)).astype(dtype)
    want = s_clean.run(None, {"x": x})[0].astype(np.float32)
    for value in (np.nan, np.inf, -50.0):
        delta = np.zeros((3, c, 6, 6), dtype)
        delta[1, c - 1, 2, 3] = value
        got = run(m, {"x": x, "delta": delta})
        assert flags(got) == (True, c * 36), value
        np.testing.assert_allclose(got["out"].astype(np.float32), want, rtol=1e-5, atol=1e-5 if dtype == np.float32
                                   else 4e-3 * np.abs(want).max())


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_chain_with_commuted_operands_recovers_flagged_items(group):
    """Paddle and tf2onnx exports write the absorbed per-channel ops with the constant first
    (``Mul(scale, conv)``, ``Add(shift, .)``, ``Add(residual, .)``). The recovery branch replays the
    chain on the recomputed items only; it once substituted the first operand (the constant) and
    kept the main graph's whole-batch Conv output, so ScatterND failed for one flagged item of two
    and two flagged items got wrong values. Batch 2, one and two flagged items: detected, recomputed,
    outputs equal the fault-free ones."""
    rng = np.random.default_rng(10 + group)
    c = 4
    inits = [nh.from_array((rng.standard_normal((c, c // group, 3, 3)) * 0.3).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(c).astype(np.float32), "b"),
             nh.from_array(rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32), "mulc"),
             nh.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), "addc")]
    model = make([h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1]),
                  h.make_node("Mul", ["mulc", "y"], ["sc"], name="mul"),
                  h.make_node("Add", ["addc", "sc"], ["sh"], name="shift"),
                  h.make_node("Add", ["x", "sh"], ["res"], name="add"),
                  h.make_node("Relu", ["res"], ["out"], name="relu")],
                 [vi("x", ["n", c, 5, 5])], [vi("out", ["n", c, 5, 5])], inits)
    r = abft(model, expose_flags=True, precision="fp32")
    onnx.checker.check_model(r.model, full_check=True)
    (plan,) = r.details["convs"]
    assert plan["absorbed"] == ["mul", "shift", "add"]
    m = perturbed(r.model, "c000")
    s_clean = session(model)
    x = rng.standard_normal((2, c, 5, 5)).astype(np.float32)
    want = s_clean.run(None, {"x": x})[0]
    for bad_items in ([1], [0, 1]):
        delta = np.zeros_like(x)
        for i in bad_items:
            delta[i, i + 1, 2, 3] = -50.0
        got = run(m, {"x": x, "delta": delta})
        assert flags(got) == (True, len(bad_items) * c * 25), bad_items
        np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-5)


def test_reshape_rank_recovered_for_tf2onnx_flatten():
    """tf2onnx's Flatten (Shape -> Cast -> Slice -> Concat -> Cast -> Reshape): shape inference
    loses the rank of the MatMul's input; the pass recovers it from the length of the Reshape's
    shape input (sizes stay dynamic), protects the unit, keeps fault-free outputs identical and
    recovers a corrupted output at two batch sizes."""
    w = RNG.standard_normal((48, 5)).astype(np.float32)
    ints = lambda v, n: nh.from_array(np.array(v, np.int64), n)  # noqa: E731
    model = make([h.make_node("Relu", ["x"], ["xr"], name="relu"),
                  h.make_node("Shape", ["xr"], ["shp"], name="shape"),
                  h.make_node("Cast", ["shp"], ["shp32"], name="cast32", to=T.INT32),
                  h.make_node("Slice", ["shp32", "zero", "one", "zero"], ["batch"], name="slice"),
                  h.make_node("Concat", ["batch", "minus1"], ["target32"], name="concat", axis=0),
                  h.make_node("Cast", ["target32"], ["target"], name="cast64", to=T.INT64),
                  h.make_node("Reshape", ["xr", "target"], ["flat"], name="flatten"),
                  h.make_node("MatMul", ["flat", "w"], ["out"], name="dense")],
                 [vi("x", ["n", 3, 4, 4])], [vi("out", [None, 5])],
                 [nh.from_array(w, "w"), ints([0], "zero"), ints([1], "one"),
                  nh.from_array(np.array([-1], np.int32), "minus1")])
    r = abft(model, expose_flags=True)
    assert [g["name"] for g in r.details["gemms"]] == ["dense"] and not r.skipped
    onnx.checker.check_model(r.model, full_check=True)
    for batch in (2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4, 4)).astype(np.float32)
        want = np.maximum(x, 0).reshape(batch, -1).astype(np.float64) @ w
        got = run(r.model, {"x": x})
        np.testing.assert_array_equal(got["out"], run(model, {"x": x})["out"])
        assert flags(got) == (False, 0)
        delta = np.zeros((batch, 5), np.float32)
        delta[batch - 1, 3] = 1e5
        got = run(perturbed(r.model), {"x": x, "delta": delta})
        assert flags(got)[0]
        np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-5)


def gelu_linear_model():
    """torch's exported GELU (x * 0.5 * (1 + erf(x / sqrt 2))) then a Linear: A >= -0.17."""
    c = lambda v, n: nh.from_array(np.array(v, np.float32), n)  # noqa: E731
    return make([h.make_node("Div", ["x", "sqrt2"], ["g0"], name="div"),
                  h.make_node("Erf", ["g0"], ["g1"], name="erf"),
                  h.make_node("Add", ["g1", "one"], ["g2"], name="add1"),
                  h.make_node("Mul", ["x", "g2"], ["g3"], name="mul"),
                  h.make_node("Mul", ["g3", "half"], ["g"], name="mul_half"),
                  h.make_node("MatMul", ["g", "w"], ["y"], name="fc2"),
                  h.make_node("Add", ["y", "bias"], ["out"], name="fc2_bias")],
                 [vi("x", ["n", 6, 8])], [vi("out", ["n", 6, 12])],
                 [nh.from_array(W, "w"), nh.from_array(BIAS, "bias"), c(np.sqrt(2.0), "sqrt2"), c(1.0, "one"),
                  c(0.5, "half")])


def test_gelu_input_needs_no_abs_pass():
    """A GELU output is >= -0.17, so the scale |A| @ |B|e is bounded by A @ |B|e + 0.34 sum|B|e
    without an Abs pass over A: no Abs on A in the graph, no false alarm on inputs with many
    negative GELU outputs (x near -0.75, where GELU is lowest), a corrupted output recovered."""
    from onnxft.passes.abft import GELU_MIN, _lower_bound, _Model

    from math import erf
    assert min(v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in np.linspace(-6, 6, 4001)) > -GELU_MIN
    model = gelu_linear_model()
    assert _lower_bound(_Model(model), "g") == GELU_MIN
    # (fp32: the small error below is within the default tf32 bound)
    r = abft(model, scheme="lb", block_size=4, expose_flags=True, precision="fp32")
    assert not any(n.op_type == "Abs" and n.input[0] == "g" for n in r.model.graph.node)
    rng = np.random.default_rng(2)
    for x in (rng.standard_normal((4, 6, 8)) * 3, rng.uniform(-1.2, -0.4, (4, 6, 8)),
              rng.uniform(-0.1, 0.1, (4, 6, 8))):
        feeds = {"x": x.astype(np.float32)}
        got = run(r.model, feeds)
        np.testing.assert_array_equal(got["out"], run(model, feeds)["out"])
        assert flags(got) == (False, 0)
    feeds = {"x": rng.uniform(-1.2, -0.4, (2, 6, 8)).astype(np.float32)}
    delta = np.zeros((2, 6, 12), np.float32)
    delta[1, 2, 7] = 1e-3  # small: within what the old |A| scale would also catch
    got = run(perturbed(r.model), {**feeds, "delta": delta})
    assert flags(got) == (True, 16)
    np.testing.assert_allclose(got["out"], run(model, feeds)["out"], rtol=1e-5, atol=1e-6)


def test_range_restricted_input_lower_bound():
    """A range restriction Clip(x, lo, hi) (role protection, as harden inserts it) bounds A below by
    lo: the no-Abs scale uses c = -lo; a Clip of the model's own is not trusted."""
    from onnxft.graph.roles import set_role
    from onnxft.passes.abft import _lower_bound, _Model

    lo = nh.from_array(np.array(-0.3, np.float32), "lo")
    hi = nh.from_array(np.array(2.0, np.float32), "hi")
    for role, want in ((PROTECTION, 0.3), (None, None)):
        clip = h.make_node("Clip", ["x", "lo", "hi"], ["a"], name="clip")
        if role:
            set_role(clip, role)
        m = make([clip, h.make_node("MatMul", ["a", "w"], ["out"], name="mm")], [vi("x", ["n", 8])],
                 [vi("out", ["n", 12])], [nh.from_array(W, "w"), lo, hi])
        assert _lower_bound(_Model(m), "a") == (pytest.approx(want) if want else None)


def test_injected_faults_recovered_in_dynamic_token_vit():
    """Real injected faults (the inject pass's own fault operators) at protected MatMul sites of a
    ViT with a dynamic token axis, hardened with LB-ABFT, at two token counts: the output equals
    the fault-free output; the same fault in the unprotected model changes it."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vit_graph.py"
    spec = importlib.util.spec_from_file_location("vit_graph", path)
    vit_graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vit_graph)
    model = vit_graph.build_vit(image=32, patch=8, dim=32, depth=1, heads=2, classes=10, dynamic_tokens=True)
    r = abft(model, scheme="lb", shapes={"x": [1, 3, 32, 32]})
    assert {g["scheme"] for g in r.details["gemms"]} == {"lb"} and not r.skipped
    sess = InjectionSession(inject(r.model).model, "cpu", threads=1)
    plain = InjectionSession(inject(model).model, "cpu", threads=1)
    rng = np.random.default_rng(0)
    for image in (32, 24):  # 17 and 10 tokens
        x = rng.standard_normal((2, 3, image, image)).astype(np.float32)
        clean, plans = sess.clean({"x": x})
        np.testing.assert_allclose(clean[0], run(model, {"x": x})["logits"], rtol=1e-5, atol=1e-6)
        sites = [i for i, s in enumerate(sess.table.sites) if s.kind == "gemm" and s.op_type == "MatMul"]
        assert len(sites) == len(r.details["gemms"])
        for i in sites:
            plan = plans[i]
            element = int(rng.integers(plan.elements))
            f = Faults(np.array([i]), np.array([1]), np.array([element]), np.array([2 * plan.k - 2]), np.array([30]))
            np.testing.assert_allclose(sess.run({"x": x}, f)[0], clean[0], rtol=1e-5, atol=1e-5)
        c0, p0 = plain.clean({"x": x})
        j = next(k for k, s in enumerate(plain.table.sites) if s.node == "/blocks.0/mlp/fc2/MatMul")
        f = Faults(np.array([j]), np.array([1]), np.array([3]), np.array([2 * p0[j].k - 2]), np.array([30]))
        assert np.abs(plain.run({"x": x}, f)[0] - c0[0]).max() > 1e-3


def test_dynamic_hardened_graph_runs_on_stock_onnxruntime(tmp_path):
    """The dynamic-shape forms (run-time block grids and thresholds, float16 checks)
    are standard ONNX: a fresh interpreter that cannot import onnxft runs them at default
    optimisation level, at run-time shapes other than the representative ones, with the original's outputs."""
    cases = {"av": (dynamic_av_model(), feeds_for(dynamic_av_model(), 2, 3, 7)),
             "qk": (dynamic_attention_model(), feeds_for(dynamic_attention_model(), 3, 4, 13)),
             "fp16": (fp16_model(), {"x": np.random.default_rng(1).standard_normal((2, 9, 16)).astype(np.float16)})}
    for name, (model, feeds) in cases.items():
        r = abft(model, scheme="lb", block_size=4)
        onnx.checker.check_model(r.model, full_check=True)
        got = run_on_stock_onnxruntime(r.model, feeds, tmp_path)
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        tol = 4e-3 * float(np.abs(want.astype(np.float32)).max()) if name == "fp16" else 0
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=tol)
