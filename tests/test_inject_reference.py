"""The dense reference test: injection graphs with a fixed fault list against ``tests/reference.py``.

For small random models, ``InjectionSession.run(feeds, faults)`` must equal the dense reference
interpreter executing every multiply/add one at a time with the same faults: within float rounding
of the sequential semantics (|a - r| <= rtol * max(|r|, 1) with identical NaN/Inf positions) and,
for the fp32 GEMM sites, bit for bit under the documented float rule
(``R.matmul_applied_reference``; docs/fault_model.md "Float faults, to the bit"). Every case mixes hand-picked faults (products, partial sums, the
final sum, the bias add, sign/exponent bits, several faults in one output element, faults in
different items) with faults sampled at a high BER (dozens per run). BER 0 must reproduce the
model's plain onnxruntime output bit for bit, and every injection graph passes the full checker.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import reference as R
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.passes.decompose import decompose
from onnxft.passes.inject import inject, prepare
from onnxft.runtime.session import InjectionSession

RTOL32 = 1e-5
RTOL16 = 2e-3  # two binary16 ulps


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def build(model, level="all", **kw):
    r = inject(model, **kw)
    onnx.checker.check_model(r.model, full_check=True)
    return InjectionSession(r.model, "cpu", threads=1, level=level)


ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def plain_run(model, feeds, level=ALL):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def site_index(sess, op_type=None, output=None):
    hits = [i for i, s in enumerate(sess.table.sites)
            if (op_type is None or s.op_type == op_type) and (output is None or s.output == output)]
    assert len(hits) == 1, (op_type, output, [(s.op_type, s.output) for s in sess.table.sites])
    return hits[0]


def hand(rows):
    """Faults from (site, item, element, step, bit) rows."""
    a = np.array(rows, np.int64).reshape(-1, 5)
    return Faults(*(a[:, i].copy() for i in range(5)))


def only(faults: Faults, site: int) -> Faults:
    sel = faults.site == site
    return Faults(*(getattr(faults, f)[sel] for f in ("site", "item", "element", "step", "bit")))


def merge(*parts: Faults) -> Faults:
    """Concatenate fault sets, dropping repeated rows (the sampler never repeats a position)."""
    f = Faults.concat(list(parts))
    key = np.stack([f.site, f.item, f.element, f.step, f.bit], 1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    return Faults(*(getattr(f, n)[first] for n in ("site", "item", "element", "step", "bit")))


def sampled(plans, ber, seed, site=None, minimum=20):
    f = sample_faults(plans, ber, np.random.default_rng(seed))
    if site is not None:
        f = only(f, site)
    assert len(f) >= minimum, f"expected dozens of sampled faults, got {len(f)}"
    return f


def gemm_rows(faults: Faults, site: int, out_shape):
    f = only(faults, site)
    return [(R.flat_element(i, e, out_shape), s, b) for i, e, s, b in zip(f.item, f.element, f.step, f.bit)]


def ew_rows(faults: Faults, site: int, out_shape):
    f = only(faults, site)
    return [(R.flat_element(i, e, out_shape), b) for i, e, b in zip(f.item, f.element, f.bit)]


def assert_close(actual, expected, rtol, what=""):
    """|a - e| <= rtol * max(|e|, 1) elementwise, with identical NaN and +/-Inf positions."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} vs {e.shape}"
    for test, label in ((np.isnan, "NaN"), (np.isposinf, "+Inf"), (np.isneginf, "-Inf")):
        np.testing.assert_array_equal(test(a), test(e), err_msg=f"{what}: {label} positions differ")
    fin = np.isfinite(e)
    err = np.abs(a[fin] - e[fin])
    tol = rtol * np.maximum(np.abs(e[fin]), 1.0)
    bad = np.nonzero(err > tol)[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {fin.sum()} differ beyond rounding; "
                           f"got {a[fin][bad[:4]]}, want {e[fin][bad[:4]]}")


def assert_bits_equal(actual, expected, what=""):
    """Bit-identical, except that any NaN matches any NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.dtype == e.dtype and a.shape == e.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=what)
    keep = ~np.isnan(e)
    np.testing.assert_array_equal(a[keep].view(np.uint8), e[keep].view(np.uint8), err_msg=what)


def check_ber0(sess, model, feeds, level=ALL, default_close=True):
    """Empty Faults (and BER 0 sampling) give the plain-onnxruntime output of ``model`` bit for bit.

    ``level``: the optimisation level of the plain run. Some default-level (ALL) rewrites of
    onnxruntime (QDQ fusion into integer kernels) cannot match across the fault operators that
    follow each site, so for those models the injection graph matches plain onnxruntime at a lower
    level bit for bit and the default level only within rounding (see the callers).
    """
    plans = sess.plans(feeds)
    assert len(sample_faults(plans, 0.0, np.random.default_rng(0))) == 0
    got = sess.run(feeds, Faults.empty())
    want = plain_run(model, feeds, level)
    assert len(got) == len(want)
    for g_, w_ in zip(got, want):
        assert_bits_equal(g_, w_, "BER 0 vs plain onnxruntime")
    if level != ALL and default_close:
        for g_, w_ in zip(got, plain_run(model, feeds)):
            np.testing.assert_allclose(g_, w_, rtol=1e-5, atol=1e-5)
    clean, _ = sess.clean(feeds)
    for c, g_ in zip(clean, got):
        assert_bits_equal(c, g_, "clean() vs run(empty)")


# --------------------------------------------------------------------------------------------
# MatMul
# --------------------------------------------------------------------------------------------


def _matmul_weight_model(elem, wt):
    k, n = wt.shape
    return make_model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [vi("x", elem, ["B", 5, k])], [vi("y", elem, ["B", 5, n])], [nh.from_array(wt, "w")])


def _mm_hand(k, elems):
    """Hand-picked gemm faults (site 0): (item, element, step, bit)."""
    e1, e2, e3 = elems
    return hand([
        (0, 1, 7, 3, 30),          # product exponent MSB (|p| < 2 -> huge / Inf)
        (0, 1, 7, 2 * k - 2, 20),  # ... and the final sum of the same element (chain)
        (0, 0, e1, k, 31),         # first partial sum s_1, sign
        (0, 0, e2, 2 * k - 2, 31),  # final sum sign
        (0, 0, e2, 5, 0),          # same element, product lsb
        (0, 1, e3, k + 3, 23),     # exponent lsb of a partial sum
        (0, 1, e3, k + 4, 29),     # next partial sum of the same element, exponent bit
        (0, 0, e3, 0, 22),         # same element index, other item: mantissa msb of p_0
    ])


def test_matmul_fp32_weight():
    rng = np.random.default_rng(1)
    wt = rng.standard_normal((16, 8)).astype(np.float32)
    model = _matmul_weight_model(T.FLOAT, wt)
    sess = build(model)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    feeds = {"x": x}
    check_ber0(sess, model, feeds)
    plans = sess.plans(feeds)
    assert (plans[0].k, plans[0].elements, plans[0].items) == (16, 40, 2)
    clean = sess.clean(feeds)[0][0]
    for faults in (_mm_hand(16, (0, 13, 39)), merge(_mm_hand(16, (0, 13, 39)), sampled(plans, 1e-3, 2))):
        y = sess.run(feeds, faults)[0]
        ref = R.matmul_reference(x, wt, gemm_rows(faults, 0, y.shape), "fp32")
        assert_close(y, ref, RTOL32, "MatMul fp32")
        assert_bits_equal(y, R.matmul_applied_reference(x, wt, gemm_rows(faults, 0, y.shape), "fp32", clean),
                          "MatMul fp32 to the bit")
        assert not np.array_equal(y, clean)


def test_matmul_fp32_activation_x_activation():
    """Attention-style Q @ K^T: 4-D operands that are both graph inputs."""
    rng = np.random.default_rng(3)
    model = make_model([h.make_node("MatMul", ["q", "kt"], ["s"], name="qk")],
                       [vi("q", T.FLOAT, ["B", 2, 4, 8]), vi("kt", T.FLOAT, ["B", 2, 8, 4])],
                       [vi("s", T.FLOAT, ["B", 2, 4, 4])])
    sess = build(model)
    q = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    kt = rng.standard_normal((2, 2, 8, 4)).astype(np.float32)
    feeds = {"q": q, "kt": kt}
    check_ber0(sess, model, feeds)
    plans = sess.plans(feeds)
    assert (plans[0].k, plans[0].elements) == (8, 32)
    hand_f = _mm_hand(8, (0, 21, 31))
    clean = sess.clean(feeds)[0][0]
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3, 4))):
        y = sess.run(feeds, faults)[0]
        ref = R.matmul_reference(q, kt, gemm_rows(faults, 0, y.shape), "fp32")
        assert_close(y, ref, RTOL32, "MatMul 4-D")
        assert_bits_equal(y, R.matmul_applied_reference(q, kt, gemm_rows(faults, 0, y.shape), "fp32", clean),
                          "MatMul 4-D to the bit")


def test_matmul_fp32_chain_through_huge_partial_sum():
    """A product flipped to ~1e38, then a sign flip of the huge partial sum, then an exponent flip
    that brings a later partial sum back to a small value: sequential semantics, no overflow to
    NaN, no cancellation. Also faults on -0 products (x = 0): the flip acts on -0's pattern."""
    rng = np.random.default_rng(21)
    K = 16
    wt = rng.standard_normal((K, 8)).astype(np.float32)
    model = _matmul_weight_model(T.FLOAT, wt)
    sess = build(model)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[1, 2, :4] = 0.0  # products 0 * w: -0 where w < 0
    feeds = {"x": x}
    # item 0, element 9 = (row 1, col 1): choose a product with |p| < 1 so that bit 30 gives ~1e38
    p = x[0, 1, :] * wt[:, 1]
    j = int(np.nonzero((np.abs(p) < 1) & (np.abs(p) > 1e-3))[0][0])
    col = int(np.nonzero((wt[:3] < 0).any(0))[0][0])
    neg = int(np.nonzero(wt[:3, col] < 0)[0][0])  # item 1, row 2: p_neg = 0 * negative = -0
    e = 2 * 8 + col
    rows = [(0, 0, 9, j, 30), (0, 0, 9, K + j + 1, 31), (0, 0, 9, K + j + 3, 30), (0, 0, 9, K + j + 4, 2),
            (0, 1, e, neg, 30), (0, 1, e, neg + 1, 31), (0, 1, e, 2 * K - 2, 1)]
    if j + 5 > K - 1:
        pytest.skip("no suitable product")
    faults = hand(rows)
    y = sess.run(feeds, faults)[0]
    ref = R.matmul_reference(x, wt, gemm_rows(faults, 0, y.shape), "fp32")
    assert np.isfinite(ref).all() and abs(ref[0, 1, 1]) < 1e3
    assert_close(y, ref, RTOL32, "chain through a huge partial sum")
    assert_bits_equal(y, R.matmul_applied_reference(x, wt, gemm_rows(faults, 0, y.shape), "fp32", sess.clean(feeds)[0][0]),
                      "chain through a huge partial sum, to the bit")


def test_matmul_fp16():
    rng = np.random.default_rng(5)
    wt = rng.standard_normal((16, 8)).astype(np.float16)
    model = _matmul_weight_model(T.FLOAT16, wt)
    sess = build(model)
    assert sess.table.sites[0].format == "fp16"
    assert sess.table.sites[0].widths == {"product": 16, "sum": 32}
    x = rng.standard_normal((2, 5, 16)).astype(np.float16)
    feeds = {"x": x}
    check_ber0(sess, model, feeds)
    plans = sess.plans(feeds)
    assert plans[0].per_op_bits == 16 * 16 + 15 * 32
    clean = sess.clean(feeds)[0][0]
    hand_f = hand([(0, 1, 7, 3, 14), (0, 1, 7, 20, 30), (0, 0, 0, 0, 15), (0, 0, 3, 30, 31),
                   (0, 0, 3, 29, 24), (0, 1, 39, 15, 9), (0, 0, 39, 16, 12)])
    ref_clean = R.matmul_reference(x, wt, [], "fp16")
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3, 6))):
        y = sess.run(feeds, faults)[0]
        assert y.dtype == np.float16
        ref = R.matmul_reference(x, wt, gemm_rows(faults, 0, y.shape), "fp16")
        # ORT's clean fp16 MatMul does not round products to binary16; compare the faults' effect:
        # the injected output is the clean output plus the reference's change, rounded to fp16.
        with np.errstate(all="ignore"):
            want = (clean.astype(np.float32) + (ref - ref_clean)).astype(np.float16)
        assert_close(y, want, RTOL16, "MatMul fp16")


def test_gemm_decomposed():
    rng = np.random.default_rng(7)
    b = rng.standard_normal((4, 6)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    model = make_model([h.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, name="gemm")],
                       [vi("a", T.FLOAT, ["B", 6])], [vi("y", T.FLOAT, ["B", 4])],
                       [nh.from_array(b, "b"), nh.from_array(c, "c")])
    sess = build(model)
    mm, add = site_index(sess, "MatMul"), site_index(sess, "Add")
    assert [s.origin for s in sess.table.sites] == ["Gemm", "Gemm"]
    a = rng.standard_normal((3, 6)).astype(np.float32)
    feeds = {"a": a}
    check_ber0(sess, decompose(prepare(model)).model, feeds)
    np.testing.assert_allclose(sess.clean(feeds)[0][0], plain_run(model, feeds)[0], rtol=1e-6, atol=1e-6)
    plans = sess.plans(feeds)
    hand_f = hand([(mm, 0, 1, 2, 30), (mm, 0, 1, 8, 4), (mm, 2, 3, 10, 31), (mm, 1, 0, 7, 26),
                   (add, 0, 1, 0, 31), (add, 2, 2, 0, 30), (add, 1, 0, 0, 3)])
    # the clean MatMul output as onnxruntime's kernel computes it (the same op on the same operands)
    mm_model = make_model([h.make_node("MatMul", ["a", "bt"], ["p"])], [vi("a", T.FLOAT, ["B", 6])],
                          [vi("p", T.FLOAT, ["B", 4])], [nh.from_array(np.ascontiguousarray(b.T), "bt")])
    clean_mm = plain_run(mm_model, feeds)[0]
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-2, 8))):
        assert {mm, add} <= set(faults.site.tolist())
        y = sess.run(feeds, faults)[0]
        prod = R.matmul_reference(a, b.T, gemm_rows(faults, mm, y.shape), "fp32")
        with np.errstate(all="ignore"):
            ref = R.elementwise_reference(prod + c, ew_rows(faults, add, y.shape), "fp32")
            exact = R.matmul_applied_reference(a, b.T, gemm_rows(faults, mm, y.shape), "fp32", clean_mm)
            exact = R.elementwise_reference(exact + c, ew_rows(faults, add, y.shape), "fp32")
        assert_close(y, ref, RTOL32, "Gemm")
        assert_bits_equal(y, exact, "Gemm to the bit")


# --------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------


def _conv_model(x_shape, w, bias, **attrs):
    inputs = ["x", "w"] + (["bias"] if bias is not None else [])
    inits = [nh.from_array(w, "w")] + ([nh.from_array(bias, "bias")] if bias is not None else [])
    node = h.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return make_model([node], [vi("x", T.FLOAT, ["B"] + list(x_shape[1:]))], [vi("y", T.FLOAT, None)], inits)


def test_conv_pads_stride_bias_group_dilation():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    attrs = dict(pads=[1, 1, 1, 1], strides=[2, 2], dilations=[2, 2], group=2)
    model = _conv_model((2, 4, 7, 7), w, bias, **attrs)
    sess = build(model)
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    feeds = {"x": x}
    check_ber0(sess, model, feeds)
    plans = sess.plans(feeds)
    k = 18
    assert plans[0].k == k and plans[0].out_shape == (2, 6, 3, 3) and sess.table.sites[0].bias
    assert plans[0].per_op_bits == (2 * k) * 32
    hand_f = hand([
        (0, 0, 0, 0, 30),          # padding product 0*w (row -1) flipped -> +/-2.0
        (0, 0, 0, k + 1, 12),      # partial sum of the same element
        (0, 0, 0, 2 * k - 1, 31),  # and its bias add (three faults, one element)
        (0, 1, 53, 2 * k - 2, 30),  # final sum (before the bias) exponent MSB
        (0, 1, 53, 2 * k - 1, 1),  # then the bias add
        (0, 1, 20, 9, 31),         # product sign, other item
        (0, 0, 40, 2 * k - 1, 25),  # bias add alone, second group's channel
    ])
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3, 10))):
        y = sess.run(feeds, faults)[0]
        ref = R.conv_reference(x, w, bias, [2, 2], [1, 1, 1, 1], [2, 2], 2, gemm_rows(faults, 0, y.shape), "fp32")
        assert_close(y, ref, RTOL32, "Conv")


def test_conv_auto_pad_same_upper():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = _conv_model((2, 3, 8, 7), w, None, auto_pad="SAME_UPPER", strides=[2, 2])
    sess = build(model)
    x = rng.standard_normal((2, 3, 8, 7)).astype(np.float32)
    feeds = {"x": x}
    # The site's Conv stays in the main graph, so onnxruntime's rewrites (NCHWc layout at level
    # ALL) reach it exactly as in the plain model.
    check_ber0(sess, model, feeds, level=ALL)
    plans = sess.plans(feeds)
    assert plans[0].out_shape == (2, 4, 4, 4) and plans[0].k == 27
    # SAME_UPPER: total padding (out-1)*stride + kernel - in, the odd one at the end.
    pads = []
    for size, out in ((8, 4), (7, 4)):
        total = max((out - 1) * 2 + 3 - size, 0)
        pads.append((total // 2, total - total // 2))
    pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    assert pads == [0, 1, 1, 1]
    k = 27
    hand_f = hand([(0, 0, 0, 0, 30), (0, 0, 3, 2, 30), (0, 1, 15, 26, 30), (0, 1, 15, 2 * k - 2, 31),
                   (0, 1, 63, 3 * 9 - 1, 29), (0, 0, 12, k, 7)])
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3, 12))):
        y = sess.run(feeds, faults)[0]
        ref = R.conv_reference(x, w, None, [2, 2], pads, [1, 1], 1, gemm_rows(faults, 0, y.shape), "fp32")
        assert_close(y, ref, RTOL32, "Conv SAME_UPPER")


# --------------------------------------------------------------------------------------------
# int8 QDQ
# --------------------------------------------------------------------------------------------

SA, ZA = np.float32(2.0 ** -4), 131


def _quantized_activation(rng, shape):
    """A float input that quantizes exactly to the returned uint8 codes."""
    q = rng.integers(0, 256, shape).astype(np.uint8)
    x = ((q.astype(np.float32) - ZA) * SA).astype(np.float32)
    return x, q


def _qdq_inits(sb, zb, axis):
    return [nh.from_array(np.array(SA, np.float32), "sa"), nh.from_array(np.array(ZA, np.uint8), "za"),
            nh.from_array(sb, "sb"), nh.from_array(zb, "zb")]


def _check_int(sess, feeds, faults, delta_ref, faulty_ref, scale, what):
    """injected - clean == (faulty_int - clean_int) * sa * sb[channel] within float rounding, and
    bit-exactly where every value is a binary32-exact multiple of a power-of-two scale."""
    clean = sess.clean(feeds)[0][0]
    y = sess.run(feeds, faults)[0]
    assert_close(y, clean.astype(np.float64) + delta_ref * scale, RTOL32, what)
    pow2 = np.all(np.log2(scale) == np.round(np.log2(scale)))
    if pow2 and np.abs(faulty_ref).max() < 2 ** 24 and np.abs(delta_ref).max() < 2 ** 24:
        np.testing.assert_array_equal(y.astype(np.float64), faulty_ref * scale, err_msg=f"{what}: not bit-exact")
        return True
    return False


def check_ber0_qdq(sess, model, feeds):
    """onnxruntime fuses DequantizeLinear -> MatMul/Conv into integer kernels (level EXTENDED and up);
    its x86 u8s8 kernel can saturate, so the default-level output may differ by far more than
    rounding. Campaigns therefore run QDQ models (original and injection graph) at level BASIC,
    where both compute the QDQ graph's float semantics bit for bit."""
    check_ber0(sess, model, feeds, level=BASIC, default_close=False)


@pytest.mark.parametrize("widths", [(16, 32), (8, 8)])
@pytest.mark.parametrize("pow2", [True, False])
def test_qdq_matmul_int8(widths, pow2):
    rng = np.random.default_rng(13)
    K, N = 8, 5
    qw = rng.integers(-128, 128, (K, N)).astype(np.int8)
    zb = np.array([0, 2, -3, 1, 0], np.int8)
    sb = (2.0 ** -rng.integers(5, 9, N) if pow2 else rng.uniform(0.002, 0.02, N)).astype(np.float32)
    nodes = [
        h.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_x"),
        h.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dq_x"),
        h.make_node("DequantizeLinear", ["wq", "sb", "zb"], ["wd"], name="dq_w", axis=1),
        h.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [vi("x", T.FLOAT, ["B", 4, K])], [vi("y", T.FLOAT, ["B", 4, N])],
                       _qdq_inits(sb, zb, 1) + [nh.from_array(qw, "wq")])
    sess = build(model, level="basic", int_widths=widths)
    site = sess.table.sites[0]
    assert len(sess.table.sites) == 1 and site.format == "int8" and site.per_channel
    assert site.widths == {"product": widths[0], "sum": widths[1]}
    x, qx = _quantized_activation(rng, (2, 4, K))
    feeds = {"x": x}
    check_ber0_qdq(sess, model, feeds)
    plans = sess.plans(feeds)
    wp, wa = widths
    assert plans[0].per_op_bits == K * wp + (K - 1) * wa
    hand_f = hand([(0, 0, 0, 0, wp - 1), (0, 0, 0, K + 2, wa - 2), (0, 0, 0, 2 * K - 2, 5),
                   (0, 1, 19, 3, 7), (0, 1, 19, 2 * K - 2, wa - 1), (0, 1, 6, K, 0), (0, 0, 11, 4, wp - 2)])
    clean_int = R.matmul_int_reference(qx, ZA, qw, zb, [], wp, wa)
    low = hand([(0, 0, 2, 1, min(wp - 1, 12)), (0, 0, 2, K + 1, min(wa - 1, 16)), (0, 1, 7, 2 * K - 2, 4)])
    ber = 3e-3 if widths == (16, 32) else 1e-2
    for n_set, faults in enumerate((hand_f, low, merge(hand_f, sampled(plans, ber, 14)))):
        faulty = R.matmul_int_reference(qx, ZA, qw, zb, gemm_rows(faults, 0, clean_int.shape), wp, wa)
        exact = _check_int(sess, feeds, faults, (faulty - clean_int).astype(np.float64),
                           faulty.astype(np.float64), (np.float64(SA) * sb.astype(np.float64)), "QDQ MatMul")
        if pow2 and (n_set == 1 or widths == (8, 8)):
            assert exact  # every value is binary32-exact: the injected output is bit-exact


@pytest.mark.parametrize("widths", [(16, 32), (8, 8)])
def test_qdq_conv_int8_per_channel(widths):
    rng = np.random.default_rng(15)
    M = 6
    qw = rng.integers(-128, 128, (M, 2, 3, 3)).astype(np.int8)
    zb = rng.integers(-2, 3, M).astype(np.int8)
    sb = (2.0 ** -rng.integers(5, 9, M)).astype(np.float32)
    bias_q = rng.integers(-3000, 3000, M).astype(np.int32)
    attrs = dict(pads=[1, 1, 1, 1], strides=[2, 2], dilations=[2, 2], group=2)
    nodes = [
        h.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_x"),
        h.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dq_x"),
        h.make_node("DequantizeLinear", ["wq", "sb", "zb"], ["wd"], name="dq_w", axis=0),
        h.make_node("DequantizeLinear", ["bq", "sbias"], ["bd"], name="dq_b", axis=0),
        h.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="conv", **attrs),
    ]
    inits = _qdq_inits(sb, zb, 0) + [nh.from_array(qw, "wq"), nh.from_array(bias_q, "bq"),
                                     nh.from_array((SA * sb).astype(np.float32), "sbias")]
    model = make_model(nodes, [vi("x", T.FLOAT, ["B", 4, 7, 7])], [vi("y", T.FLOAT, None)], inits)
    sess = build(model, level="basic", int_widths=widths)
    site = sess.table.sites[0]
    assert len(sess.table.sites) == 1 and site.format == "int8" and site.kind == "conv" and site.bias
    x, qx = _quantized_activation(rng, (2, 4, 7, 7))
    feeds = {"x": x}
    check_ber0_qdq(sess, model, feeds)
    plans = sess.plans(feeds)
    wp, wa = widths
    K = 18
    hand_f = hand([(0, 0, 0, 0, wp - 1), (0, 0, 0, K + 1, 3), (0, 0, 0, 2 * K - 1, wa - 1),
                   (0, 1, 31, 2 * K - 1, 6), (0, 1, 31, 2 * K - 2, 2), (0, 1, 50, 10, 5)])
    clean_int = R.conv_int_reference(qx, ZA, qw, zb, bias_q, [2, 2], [1, 1, 1, 1], [2, 2], 2, [], wp, wa)
    scale = (np.float64(SA) * sb.astype(np.float64))[None, :, None, None]
    low = hand([(0, 0, 5, 3, min(wp - 1, 13)), (0, 0, 5, 2 * K - 1, min(wa - 1, 17)), (0, 1, 50, K + 4, 5)])
    ber = 2e-3 if widths == (16, 32) else 5e-3
    for n_set, faults in enumerate((hand_f, low, merge(hand_f, sampled(plans, ber, 16)))):
        faulty = R.conv_int_reference(qx, ZA, qw, zb, bias_q, [2, 2], [1, 1, 1, 1], [2, 2], 2,
                                      gemm_rows(faults, 0, clean_int.shape), wp, wa)
        exact = _check_int(sess, feeds, faults, (faulty - clean_int).astype(np.float64),
                           faulty.astype(np.float64), scale, "QDQ Conv")
        if n_set == 1 or widths == (8, 8):
            assert exact  # power-of-two scales: bit-exact


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_elementwise_add_mul(dtype):
    rng = np.random.default_rng(17)
    elem, fmt = (T.FLOAT, "fp32") if dtype == np.float32 else (T.FLOAT16, "fp16")
    c = rng.standard_normal((16, 32)).astype(dtype)
    model = make_model([h.make_node("Add", ["x", "c"], ["t"], name="add"),
                        h.make_node("Mul", ["t", "x"], ["y"], name="mul")],
                       [vi("x", elem, ["B", 16, 32])], [vi("y", elem, ["B", 16, 32])], [nh.from_array(c, "c")])
    sess = build(model)
    add, mul = site_index(sess, "Add"), site_index(sess, "Mul")
    x = rng.standard_normal((3, 16, 32)).astype(dtype)
    x.reshape(-1)[:4] = [1.5, -1.25, 3.0, 0.75]
    feeds = {"x": x}
    if dtype == np.float32:
        check_ber0(sess, model, feeds)
    else:
        # onnxruntime's CPU runs float16 Add/Mul through float32 and drops the Cast pair between
        # them, so plain onnxruntime does not round t = x + c to float16; each site's If keeps that
        # rounding. BER 0 is bit-exact against binary16 arithmetic and close to plain onnxruntime.
        got = sess.run(feeds, Faults.empty())[0]
        assert_bits_equal(got, (x + c) * x, "fp16 BER 0 vs numpy binary16")
        np.testing.assert_allclose(got.astype(np.float32), plain_run(model, feeds)[0].astype(np.float32),
                                   rtol=4e-3, atol=4e-3)
    plans = sess.plans(feeds)
    top = np.dtype(dtype).itemsize * 8 - 1
    hand_f = hand([(add, 0, 0, 0, top), (add, 0, 0, 0, top - 1), (mul, 0, 0, 0, 0), (add, 2, 511, 0, top - 2),
                   (mul, 1, 7, 0, top - 1), (mul, 2, 7, 0, 3), (add, 1, 7, 0, 5)])
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3 if dtype == np.float32 else 2e-3, 18))):
        y = sess.run(feeds, faults)[0]
        with np.errstate(all="ignore"):
            t = R.elementwise_reference(x + c, ew_rows(faults, add, x.shape), fmt)
            ref = R.elementwise_reference(t * x, ew_rows(faults, mul, x.shape), fmt)
        # one IEEE operation per element and one flip: exact
        assert_bits_equal(y, ref, f"Add/Mul {fmt}")


# --------------------------------------------------------------------------------------------
# decomposed Softmax and LayerNormalization
# --------------------------------------------------------------------------------------------


def _norm_model(gamma, beta):
    nodes = [h.make_node("Softmax", ["x"], ["sm"], name="softmax", axis=-1),
             h.make_node("LayerNormalization", ["sm", "g", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)]
    d = gamma.shape[0]
    return make_model(nodes, [vi("x", T.FLOAT, ["B", 6, d])], [vi("y", T.FLOAT, ["B", 6, d])],
                      [nh.from_array(gamma, "g"), nh.from_array(beta, "b")], opset=17)


def _norm_reference(x, gamma, beta, flip):
    """numpy evaluation of the decomposed primitive chain; ``flip(output_name, value)`` applies
    the faults of the site that writes ``output_name``."""
    f32 = np.float32
    with np.errstate(all="ignore"):
        m = flip("sm/max", x.max(-1, keepdims=True))
        d = flip("sm/shifted", x - m)
        e = flip("sm/exp", np.exp(d))
        s = flip("sm/sum", e.sum(-1, keepdims=True, dtype=f32))
        sm = flip("sm", e / s)
        mean = flip("y/mean", sm.mean(-1, keepdims=True, dtype=f32))
        c = flip("y/centered", sm - mean)
        sq = flip("y/sq", c * c)
        var = flip("y/var", sq.mean(-1, keepdims=True, dtype=f32))
        ve = flip("y/var_eps", var + f32(1e-5))
        std = flip("y/std", np.sqrt(ve))
        n = flip("y/normalized", c / std)
        sc = flip("y/scaled", n * gamma)
        return flip("y", sc + beta)


def test_softmax_layernorm_internal_sites():
    rng = np.random.default_rng(19)
    D = 16
    gamma = rng.standard_normal(D).astype(np.float32)
    beta = rng.standard_normal(D).astype(np.float32)
    model = _norm_model(gamma, beta)
    sess = build(model)
    outputs = [s.output for s in sess.table.sites]
    assert sorted(outputs) == sorted(["sm/max", "sm/shifted", "sm/exp", "sm/sum", "sm", "y/mean", "y/centered",
                                      "y/sq", "y/var", "y/var_eps", "y/std", "y/normalized", "y/scaled", "y"])
    assert {s.origin for s in sess.table.sites} == {"Softmax", "LayerNormalization"}
    x = (rng.standard_normal((3, 6, D)) * 2).astype(np.float32)
    feeds = {"x": x}
    # Fault-free, the fused ops run as themselves: BER 0 is the original model bit for bit.
    check_ber0(sess, model, feeds)
    plans = sess.plans(feeds)
    shapes = {p.site.output: p.out_shape for p in plans}
    exp_, div, sqrt = site_index(sess, "Exp"), site_index(sess, "Div", "sm"), site_index(sess, "Sqrt")
    hand_f = hand([
        (exp_, 0, 5, 0, 22), (exp_, 0, 5, 0, 3),   # two flips in one Exp output
        (exp_, 1, 40, 0, 31),                      # negative exponential
        (exp_, 2, 95, 0, 26),                      # exponent bit
        (div, 0, 17, 0, 24), (div, 2, 3, 0, 31),   # softmax output
        (sqrt, 1, 2, 0, 23), (sqrt, 2, 5, 0, 29), (sqrt, 0, 0, 0, 10),  # LayerNorm std
    ])
    for faults in (hand_f, merge(hand_f, sampled(plans, 1e-3, 20))):
        by_site = {}
        for s_idx, site in enumerate(sess.table.sites):
            by_site[site.output] = ew_rows(faults, s_idx, shapes[site.output])

        def flip(name, value):
            return R.elementwise_reference(value, by_site[name], "fp32") if by_site[name] else value

        y = sess.run(feeds, faults)[0]
        ref = _norm_reference(x, gamma, beta, flip)
        assert_close(y, ref, 1e-4, "Softmax/LayerNorm")
        assert np.abs(y - sess.clean(feeds)[0][0]).max() > 0 or np.isnan(y).any()
