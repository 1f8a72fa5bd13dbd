"""Every convolution is a fault site: Conv 1-D and 3-D, grouped and depthwise, ConvTranspose.

Each case runs the injection graph with hand-picked and sampled faults and compares it with the
dense reference (tests/reference.py) bit for bit, under the documented float rule
(``conv_nd_reference(..., applied_to=clean)``, docs/fault_model.md "Float faults, to the bit").
The reference's clean convolution is checked against onnxruntime's own kernel.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import reference as R
from onnxft.faults.sites import SiteTable
from onnxft.passes.inject import inject
from test_inject_reference import (BASIC, RTOL16, RTOL32, SA, ZA, _qdq_inits, _quantized_activation, assert_bits_equal,
                                   assert_close, build, check_ber0, gemm_rows, hand, make_model, merge, sampled, vi)

CASES = {
    # name: (op, x shape, weight shape, attributes)
    "conv1d": ("Conv", (2, 4, 11), (6, 2, 3), dict(pads=[1, 2], strides=[2], dilations=[2], group=2)),
    "conv1d_depthwise": ("Conv", (2, 5, 9), (5, 1, 5), dict(pads=[2, 2], group=5)),
    "conv2d_depthwise": ("Conv", (2, 4, 6, 6), (4, 1, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 1], group=4)),
    "conv3d": ("Conv", (2, 2, 4, 5, 3), (3, 2, 2, 3, 2), dict(pads=[1, 0, 1, 0, 1, 1], strides=[1, 2, 1])),
    "conv3d_grouped": ("Conv", (2, 4, 3, 4, 4), (4, 2, 2, 2, 3), dict(pads=[0, 1, 1, 1, 0, 1], dilations=[1, 2, 1],
                                                                        group=2)),
    "convtranspose1d": ("ConvTranspose", (2, 3, 5), (3, 2, 4), dict(strides=[3], pads=[1, 2], output_padding=[1])),
    "convtranspose2d_grouped": ("ConvTranspose", (2, 4, 4, 3), (4, 3, 3, 2),
                                dict(pads=[1, 0, 0, 1], strides=[2, 3], group=2, output_padding=[1, 0])),
    "convtranspose2d_k4s2": ("ConvTranspose", (2, 3, 3, 3), (3, 2, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "convtranspose3d": ("ConvTranspose", (2, 2, 2, 3, 2), (2, 2, 2, 2, 3), dict(strides=[2, 1, 2], dilations=[1, 2, 1])),
}


def _model(op, x_shape, w, bias, elem=T.FLOAT, **attrs):
    node = h.make_node(op, ["x", "w", "b"], ["y"], name="conv", **attrs)
    return make_model([node], [vi("x", elem, ["B"] + list(x_shape[1:]))], [vi("y", elem, None)],
                      [nh.from_array(w, "w"), nh.from_array(bias, "b")])


def _out_channels(op, w, group):
    return w.shape[1] * group if op == "ConvTranspose" else w.shape[0]


def _reference(op, x, w, bias, attrs, rows, fmt, applied_to=None):
    return R.conv_nd_reference(x, w, bias, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                               attrs.get("group", 1), rows, fmt, transpose=op == "ConvTranspose",
                               output_padding=attrs.get("output_padding"), applied_to=applied_to)


def _hand(k, n_elements):
    """Products and partial sums, low mantissa bits (0..7) included, the bias add, chains of
    several faults in one element, both items."""
    last = n_elements - 1
    return hand([
        (0, 0, 0, 0, 0), (0, 0, 0, k, 3), (0, 0, 0, 2 * k - 1, 30),  # p_0 bit 0, s_1, bias add: one element
        (0, 1, last, 2 * k - 2, 5), (0, 1, last, 2 * k - 1, 1),     # final sum and bias add, low bits
        (0, 0, last // 2, k - 1, 7), (0, 1, last // 2, 2 * k - 2, 31),  # last product, final-sum sign
        (0, 1, 1, k // 2, 30), (0, 0, 2, 2 * k - 2, 0),
    ])


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_forms_fp32_to_the_bit(case):
    op, x_shape, w_shape, attrs = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    w = rng.standard_normal(w_shape).astype(np.float32)
    bias = rng.standard_normal(_out_channels(op, w, attrs.get("group", 1))).astype(np.float32)
    model = _model(op, x_shape, w, bias, **attrs)
    sess = build(model)
    site = sess.table.sites[0]
    assert len(sess.table.sites) == 1 and site.kind == "conv" and site.op_type == op and site.bias
    x = rng.standard_normal(x_shape).astype(np.float32)
    x.reshape(-1)[:3] = 0.0  # zero inputs: products 0*w, -0 where w < 0
    feeds = {"x": x}
    check_ber0(sess, model, feeds)
    clean = sess.clean(feeds)[0][0]
    assert_close(clean, _reference(op, x, w, bias, attrs, [], "fp32"), RTOL32, f"{case} clean vs onnxruntime")
    plans = sess.plans(feeds)
    k = x_shape[1] // attrs.get("group", 1) * int(np.prod(w_shape[2:]))
    if op == "ConvTranspose":  # the taps of one output phase: the longest phase per axis
        d = len(w_shape) - 2
        strides, dil = attrs.get("strides", [1] * d), attrs.get("dilations", [1] * d)
        k = x_shape[1] // attrs.get("group", 1) * int(np.prod([
            max(sum((t * dil[i]) % strides[i] == r for t in range(w_shape[2 + i])) for r in range(strides[i]))
            for i in range(d)]))
    assert plans[0].k == k and plans[0].out_shape == clean.shape
    assert plans[0].per_op_bits == 2 * k * 32
    hand_f = _hand(k, plans[0].elements)
    for faults in (hand_f, merge(hand_f, sampled(plans, 2e-3, 3))):
        y = sess.run(feeds, faults)[0]
        rows = gemm_rows(faults, 0, y.shape)
        assert_bits_equal(y, _reference(op, x, w, bias, attrs, rows, "fp32", applied_to=clean), f"{case} bits")
        assert not np.array_equal(y, clean)


def test_conv_nd_reference_matches_the_2d_reference():
    """The N-D reference is the 2-D one where both apply (same order, same faults)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    faults = [(0, 0, 30), (0, 20, 3), (7, 35, 31), (30, 17, 12)]
    a = R.conv_nd_reference(x, w, b, [2, 1], [1, 0, 1, 1], [1, 2], 2, faults, "fp32")
    r = R.conv_reference(x, w, b, [2, 1], [1, 0, 1, 1], [1, 2], 2, faults, "fp32")
    assert_bits_equal(a, r)


def test_conv1d_fp16():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3)).astype(np.float16)
    bias = rng.standard_normal(4).astype(np.float16)
    model = _model("Conv", (2, 3, 8), w, bias, elem=T.FLOAT16, pads=[1, 1])
    sess = build(model)
    site = sess.table.sites[0]
    assert site.format == "fp16" and site.widths == {"product": 16, "sum": 32} and site.gathered
    x = rng.standard_normal((2, 3, 8)).astype(np.float16)
    feeds = {"x": x}
    check_ber0(sess, model, feeds)
    clean = sess.clean(feeds)[0][0]
    plans = sess.plans(feeds)
    assert plans[0].per_op_bits == 9 * 16 + 9 * 32
    for faults in (hand([(0, 0, 3, 2, 14), (0, 0, 3, 12, 30), (0, 1, 31, 17, 2), (0, 1, 0, 0, 15)]),
                   sampled(plans, 3e-3, 8)):
        y = sess.run(feeds, faults)[0]
        rows = gemm_rows(faults, 0, y.shape)
        # fp16 products rounded to binary16, sums in binary32, the change added to the fp16 output
        want = R.conv_nd_reference(x, w, bias, None, [1, 1], None, 1, rows, "fp16", applied_to=clean)
        assert_bits_equal(y, want, "Conv 1-D fp16")
        ref, ref0 = (R.conv_nd_reference(x, w, bias, None, [1, 1], None, 1, r, "fp16") for r in (rows, []))
        with np.errstate(all="ignore"):
            assert_close(y, (clean.astype(np.float32) + (ref - ref0)).astype(np.float16), RTOL16, "Conv 1-D fp16")


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_qdq_conv1d_int8(op):
    """QDQ 1-D Conv (per-channel weights) and ConvTranspose (per-tensor): integer products and
    sums, flips in two's complement; power-of-two scales make the injected output bit-exact."""
    rng = np.random.default_rng(17)
    transpose = op == "ConvTranspose"
    wp, wa = 16, 32
    w_shape = (4, 3, 3) if transpose else (6, 4, 3)
    m = w_shape[1] if transpose else w_shape[0]
    qw = rng.integers(-128, 128, w_shape).astype(np.int8)
    zb = np.int8(2) if transpose else rng.integers(-2, 3, m).astype(np.int8)
    sb = np.float32(2.0 ** -6) if transpose else (2.0 ** -rng.integers(5, 9, m)).astype(np.float32)
    bias_q = rng.integers(-3000, 3000, m).astype(np.int32)
    attrs = dict(strides=[2], pads=[1, 0]) if transpose else dict(pads=[1, 1], strides=[2])
    nodes = [
        h.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_x"),
        h.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dq_x"),
        h.make_node("DequantizeLinear", ["wq", "sb", "zb"], ["wd"], name="dq_w", axis=0),
        h.make_node("DequantizeLinear", ["bq", "sbias"], ["bd"], name="dq_b", axis=0),
        h.make_node(op, ["xd", "wd", "bd"], ["y"], name="conv", **attrs),
    ]
    inits = _qdq_inits(np.asarray(sb), np.asarray(zb), 0) + [
        nh.from_array(qw, "wq"), nh.from_array(bias_q, "bq"), nh.from_array((SA * sb).astype(np.float32), "sbias")]
    model = make_model(nodes, [vi("x", T.FLOAT, ["B", 4, 7])], [vi("y", T.FLOAT, None)], inits)
    sess = build(model, level="basic")
    site = sess.table.sites[0]
    assert len(sess.table.sites) == 1 and site.format == "int8" and site.gathered and site.bias
    x, qx = _quantized_activation(rng, (2, 4, 7))
    feeds = {"x": x}
    check_ber0(sess, model, feeds, level=BASIC, default_close=False)
    plans = sess.plans(feeds)
    k = plans[0].k
    clean_int = R.conv_nd_int_reference(qx, ZA, qw, zb, bias_q, attrs["strides"], attrs["pads"], None, 1, [],
                                        wp, wa, transpose=transpose)
    scale = (np.float64(SA) * np.asarray(sb, np.float64).reshape(-1))[None, :, None]
    clean = sess.clean(feeds)[0][0]
    for faults in (hand([(0, 0, 0, 0, wp - 1), (0, 0, 0, k + 1, 3), (0, 0, 0, 2 * k - 1, wa - 1),
                         (0, 1, 5, 2 * k - 2, 2), (0, 1, 9, 1, 0)]), sampled(plans, 2e-3, 16)):
        faulty = R.conv_nd_int_reference(qx, ZA, qw, zb, bias_q, attrs["strides"], attrs["pads"], None, 1,
                                         gemm_rows(faults, 0, clean_int.shape), wp, wa, transpose=transpose)
        y = sess.run(feeds, faults)[0]
        assert_close(y, clean.astype(np.float64) + (faulty - clean_int) * scale, RTOL32, f"QDQ {op}")
        if np.abs(faulty).max() < 2 ** 24:
            np.testing.assert_array_equal(y.astype(np.float64), faulty * scale, err_msg=f"QDQ {op}: not bit-exact")


def test_convtranspose_output_shape_is_reported_not_a_site():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 2, 3)).astype(np.float32)
    node = h.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2], output_shape=[10])
    model = make_model([node, h.make_node("Add", ["y", "y"], ["z"], name="add")],
                       [vi("x", T.FLOAT, [1, 2, 5])], [vi("z", T.FLOAT, None)], [nh.from_array(w, "w")])
    r = inject(model)
    assert [s.op_type for s in SiteTable.from_model(r.model).sites] == ["Add"]
    assert ("up", "ConvTranspose with output_shape or auto_pad SAME is not a site yet (give explicit pads)") in r.skipped
    assert {"node": "up", "op_type": "ConvTranspose", "reason": dict(r.skipped)["up"]} in r.details["non_sites"]


def test_chained_faults_on_negative_zero_sums():
    """All products 0 * (negative w) = -0, so every partial sum is -0: a chain of faults must flip
    -0's bit pattern (a tiny negative number, then about -2), not +0's (onnxruntime's Where
    turns a selected -0 into +0; the operator selects by gathering instead)."""
    w = -np.abs(np.random.default_rng(4).standard_normal((2, 2, 3))).astype(np.float32) - 0.5
    model = _model("Conv", (2, 2, 5), w, np.zeros(2, np.float32), pads=[1, 1])
    sess = build(model)
    x = np.zeros((2, 2, 5), np.float32)
    x[1] = 1.0
    feeds = {"x": x}
    clean = sess.clean(feeds)[0][0]
    k = 6
    faults = hand([(0, 0, 2, k, 3), (0, 0, 2, k + 2, 30), (0, 0, 7, k + 1, 31), (0, 0, 7, 2 * k - 2, 29)])
    y = sess.run(feeds, faults)[0]
    rows = gemm_rows(faults, 0, y.shape)
    want = _reference("Conv", x, w, np.zeros(2, np.float32), {"pads": [1, 1]}, rows, "fp32", applied_to=clean)
    assert want.reshape(-1)[2] < -1.5  # the chain through -0: -tiny (bit 3), then exponent bit 30: about -2
    assert_bits_equal(y, want, "chained faults on -0 partial sums")
