"""Each ``ai.onnxft`` operator (an ONNX function) run alone on onnxruntime against its numpy
reference in ``custom_ops/reference.py``.

Gemm/Conv fault tables are produced by the sampler's ``site_tables`` from hand-made site plans,
so the operators see the inputs an injection graph feeds them; the fault sets mix hand-picked
faults (products, partial sums, the last sum, the bias add, sign/exponent bits, chains of faults
in one element) with faults sampled at a high BER.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxft.custom_ops import FAULT_DOMAIN, FAULT_DOMAIN_VERSION, OPSET, all_functions
from onnxft.custom_ops.reference import REFERENCES
from onnxft.faults.sampling import Faults, SitePlan, sample_faults, site_tables
from onnxft.faults.sites import Site

FUNCTIONS = all_functions()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def run_function(name: str, inputs: list[tuple[str, np.ndarray]], **attrs):
    """Run operator ``name`` alone in a tiny opset-26 model; returns (Z, log)."""
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
           for n, a in inputs]
    node = helper.make_node(name, [n for n, _ in inputs], ["Z", "log"], domain=FAULT_DOMAIN, name="op", **attrs)
    y = inputs[2 if "Faults" in name else 0][1]
    graph = helper.make_graph([node], "g", vis, [
        helper.make_tensor_value_info("Z", helper.np_dtype_to_tensor_dtype(y.dtype), list(y.shape)),
        helper.make_tensor_value_info("log", TensorProto.DOUBLE, ["F", 2])])
    model = helper.make_model(graph, ir_version=10, functions=[FUNCTIONS[name]], opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(FAULT_DOMAIN, FAULT_DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(inputs))


def assert_close(actual, expected, rtol, what=""):
    """|a - e| <= rtol * max(|e|, 1) elementwise, with identical NaN and Inf positions."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(e), err_msg=f"{what}: +Inf positions")
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e), err_msg=f"{what}: -Inf positions")
    fin = np.isfinite(e)
    err = np.abs(a[fin] - e[fin])
    tol = rtol * np.maximum(np.abs(e[fin]), 1.0)
    bad = np.nonzero(err > tol)[0]
    assert bad.size == 0, (f"{what}: {bad.size} mismatches, first {a[fin][bad[:5]]} vs {e[fin][bad[:5]]}")


def make_site(kind, fmt, widths, bias=False, conv=None, ranks=(3, 3, 2)):
    dtype = "float16" if fmt == "fp16" else "float32"
    return Site(id="s0000", node="n", op_type="Conv" if kind == "conv" else "MatMul", kind=kind,
                format=fmt, origin="x", origin_node="n", output="y", dtype=dtype, widths=widths,
                shape_ranks=list(ranks), conv=conv or {}, bias=bias)


def gemm_plan(site, a_shape, b_shape, y_shape, pads2=None):
    wp, wa = site.widths["product"], site.widths["sum"]
    k = int(np.prod(b_shape[1:])) if site.kind == "conv" else a_shape[-1]
    per = k * wp + (k - 1) * wa + (wa if site.bias else 0)
    items = y_shape[0]
    plan = SitePlan(site, tuple(y_shape), items, int(np.prod(y_shape[1:])), per, k, tuple(a_shape), tuple(b_shape))
    if site.kind == "conv":
        plan.conv = dict(site.conv, pads2=pads2)
    return plan


def hand_faults(plan, rows):
    rows = np.array(rows, np.int64).reshape(-1, 4)
    z = np.zeros(len(rows), np.int64)
    return Faults(z, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])


def dedupe(faults: Faults) -> Faults:
    """Drop repeated (site, item, element, step, bit) rows (the sampler never repeats one)."""
    key = np.stack([faults.site, faults.item, faults.element, faults.step, faults.bit], 1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    return Faults(*(getattr(faults, f)[first] for f in ("site", "item", "element", "step", "bit")))


def gemm_inputs(plan, faults, A, B, Y, bias=None, quant=None):
    """The operator inputs (name, array) that the inject pass would wire for these faults."""
    site = plan.site
    feeds, _ = site_tables(plan, faults, 0)
    names = site.input_names()
    inputs = [("A", A), ("B", B), ("Y", Y), ("faults", feeds[names["faults"]])]
    if site.kind == "conv":
        inputs += [("a_off", feeds[names["a_off"]]), ("b_off", feeds[names["b_off"]]),
                   ("dh", feeds[names["dh"]]), ("dw", feeds[names["dw"]]), ("bias", bias)]
    if site.format == "int8":
        inputs += list(zip(("za", "zb", "sa", "sb"), quant))
    return [(n, np.asarray(v)) for n, v in inputs]


def _column(inputs, name):
    """One column of the fault table among ``inputs``."""
    named = dict(inputs)
    faults = named["faults"]
    if faults.shape[1] == 2:
        return faults[:, ("index", "mask").index(name)]
    from onnxft.custom_ops.functions import table_columns
    cols = table_columns("a_off" in named, "za" in named)
    return faults[:, cols.index(name)]


def check_operator(name, inputs, rtol, **attrs):
    z, log = run_function(name, inputs, **attrs)
    z_ref, log_ref = REFERENCES[name](*[a for _, a in inputs])
    assert z.dtype == z_ref.dtype
    index = _column(inputs, "out_index" if "Faults" in name else "index")
    assert log.shape == log_ref.shape == (len(index), 2)
    if "int" in name and "Faults" in name:
        # integer arithmetic is exact; the float update Y + float(change) * sa * sb is the same
        # sequence of binary32 operations in both
        np.testing.assert_array_equal(log, log_ref, err_msg=f"{name}: integer log must be exact")
        np.testing.assert_array_equal(z, z_ref, err_msg=f"{name}: Z must be exact")
    else:
        assert_close(log, log_ref, rtol, f"{name} log")
    assert_close(z, z_ref, rtol, f"{name} Z")
    # elements without faults are untouched, bit for bit
    touched = np.zeros(z.size, bool)
    touched[np.asarray(index)] = True
    y = inputs[2][1] if "Faults" in name else inputs[0][1]
    np.testing.assert_array_equal(z.reshape(-1)[~touched].view(np.uint8), y.reshape(-1)[~touched].view(np.uint8))
    return z, log


def test_every_function_has_a_reference():
    assert set(FUNCTIONS) == set(REFERENCES)
    for fn in FUNCTIONS.values():
        assert fn.domain == FAULT_DOMAIN


# --------------------------------------------------------------------------------------------
# FlipBits
# --------------------------------------------------------------------------------------------

_MASK_DTYPE = {"float32": np.int32, "float16": np.int16, "int8": np.int8, "uint8": np.uint8}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8"])
def test_flip_bits(dtype):
    rng = np.random.default_rng(11)
    shape = (3, 4, 5)
    if dtype.startswith("float"):
        y = (rng.standard_normal(shape) * 3).astype(dtype)
        y.reshape(-1)[0] = 1.5  # exponent flip -> Inf/NaN territory
    else:
        info = np.iinfo(dtype)
        y = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    width = np.dtype(dtype).itemsize * 8
    index = np.concatenate([[0, 1, 2, 3], 4 + rng.choice(y.size - 4, 21, replace=False)]).astype(np.int64)
    umask = rng.integers(1, 1 << width, 25).astype(np.int64)
    umask[:4] = [1 << (width - 1), 1 << (width - 2), 1, (1 << width) - 1]  # sign, top exponent, lsb, all
    mask = umask.astype(np.uint64).astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[width]).view(_MASK_DTYPE[dtype]) \
        if dtype != "uint8" else umask.astype(np.uint8)
    inputs = [("Y", y), ("faults", np.stack([index, mask.astype(np.int64)], axis=1))]
    z, log = check_operator(f"FlipBits_{dtype}", inputs, rtol=0)
    # the function itself is an exact XOR: compare bit patterns too
    ref_z, _ = REFERENCES[f"FlipBits_{dtype}"](y, inputs[1][1])
    np.testing.assert_array_equal(z.view(np.uint8), ref_z.view(np.uint8))
    u = {8: np.uint8, 16: np.uint16, 32: np.uint32}[width]
    np.testing.assert_array_equal(z.reshape(-1).view(u)[index] ^ y.reshape(-1).view(u)[index], umask.astype(u))


def test_flip_bits_empty():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    z, log = run_function("FlipBits_float32", [("Y", y), ("faults", np.zeros((0, 2), np.int64))])
    np.testing.assert_array_equal(z, y)
    assert log.shape == (0, 2)


# --------------------------------------------------------------------------------------------
# GemmFaults / ConvFaults
# --------------------------------------------------------------------------------------------

MM_A, MM_B = (2, 3, 6), (6, 4)
MM_Y = (2, 3, 4)


def _mm_hand_rows(k):
    # (item, element, step, bit)
    return [
        (0, 0, 0, 30),            # product exponent -> huge / Inf
        (0, 0, k + 2, 3),         # a later partial sum of the same element (chain)
        (0, 1, 2 * k - 2, 31),    # the final sum's sign
        (1, 5, 1, 31),            # a product's sign, other item
        (1, 5, k, 22),            # s_1 of the same element
        (1, 5, 2 * k - 2, 10),    # ... and its final sum: three faults in one element
        (1, 11, 3, 0),            # lsb of a product
        (0, 7, k + 1, 29),        # exponent bit of a partial sum
    ]


def _mm_faults(plan, rng, ber):
    hand = hand_faults(plan, _mm_hand_rows(plan.k))
    return dedupe(Faults.concat([hand, sample_faults([plan], ber, rng)]))


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
def test_gemm_faults_float(fmt):
    rng = np.random.default_rng(5)
    dt = np.float32 if fmt == "fp32" else np.float16
    site = make_site("gemm", fmt, {"product": 32 if fmt == "fp32" else 16, "sum": 32})
    plan = gemm_plan(site, MM_A, MM_B, MM_Y)
    a = rng.standard_normal(MM_A).astype(dt)
    b = rng.standard_normal(MM_B).astype(dt)
    y = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(dt)
    faults = _mm_faults(plan, rng, 5e-3)
    assert len(faults) > 20
    check_operator(f"GemmFaults_{fmt}", gemm_inputs(plan, faults, a, b, y),
                   rtol=1e-5 if fmt == "fp32" else 2e-3)


@pytest.mark.parametrize("widths", [(16, 32), (8, 8)])
def test_gemm_faults_int(widths):
    rng = np.random.default_rng(6)
    site = make_site("gemm", "int8", {"product": widths[0], "sum": widths[1]})
    plan = gemm_plan(site, MM_A, MM_B, MM_Y)
    qa = rng.integers(0, 256, MM_A).astype(np.uint8)
    qb = rng.integers(-128, 128, MM_B).astype(np.int8)
    za, zb = np.array(131, np.uint8), np.array([0, 3, -5, 1], np.int8)
    sa, sb = np.array(0.05, np.float32), np.array([0.01, 0.02, 0.005, 0.03], np.float32)
    y = np.matmul((qa.astype(np.float32) - 131) * sa, (qb.astype(np.float32) - zb) * sb).astype(np.float32)
    hand = hand_faults(plan, [(r[0], r[1], r[2], min(r[3], widths[0 if r[2] < plan.k else 1] - 1))
                              for r in _mm_hand_rows(plan.k)])
    faults = dedupe(Faults.concat([hand, sample_faults([plan], 5e-3, rng)]))
    check_operator("GemmFaults_int", gemm_inputs(plan, faults, qa, qb, y, quant=(za, zb, sa, sb)), rtol=1e-5)


CONV = {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2], "group": 2, "auto_pad": "NOTSET"}
CV_X, CV_W = (2, 4, 7, 7), (6, 2, 3, 3)


def _conv_out():
    oh = (7 + 2 - 2 * 2 - 1) // 2 + 1
    return (2, 6, oh, oh)


def _conv_rows(k, w_sum):
    return [
        (0, 0, 0, 30), (0, 0, k + 1, 5), (0, 0, 2 * k - 1, w_sum - 1),  # chain ending at the bias add
        (1, 17, 4, 31), (1, 17, 2 * k - 2, 3),
        (1, 40, 2 * k - 1, 2),  # bias add alone
        (0, 3, 0, 1),           # a padding product (0 * w) flipped
    ]


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
def test_conv_faults_float(fmt):
    rng = np.random.default_rng(7)
    dt = np.float32 if fmt == "fp32" else np.float16
    site = make_site("conv", fmt, {"product": 32 if fmt == "fp32" else 16, "sum": 32}, bias=True, conv=CONV,
                     ranks=(4, 4, 4))
    y_shape = _conv_out()
    plan = gemm_plan(site, CV_X, CV_W, y_shape, pads2=[1, 1])
    x = rng.standard_normal(CV_X).astype(dt)
    w = rng.standard_normal(CV_W).astype(dt)
    bias = rng.standard_normal(6).astype(dt)
    y = rng.standard_normal(y_shape).astype(dt)  # the operator only adds changes to Y
    faults = dedupe(Faults.concat([hand_faults(plan, _conv_rows(plan.k, 32)), sample_faults([plan], 2e-3, rng)]))
    assert len(faults) > 20
    check_operator(f"ConvFaults_{fmt}", gemm_inputs(plan, faults, x, w, y, bias=bias),
                   rtol=1e-5 if fmt == "fp32" else 2e-3)


@pytest.mark.parametrize("widths", [(16, 32), (8, 8)])
def test_conv_faults_int(widths):
    rng = np.random.default_rng(8)
    site = make_site("conv", "int8", {"product": widths[0], "sum": widths[1]}, bias=True, conv=CONV,
                     ranks=(4, 4, 4))
    y_shape = _conv_out()
    plan = gemm_plan(site, CV_X, CV_W, y_shape, pads2=[1, 1])
    qx = rng.integers(0, 256, CV_X).astype(np.uint8)
    qw = rng.integers(-128, 128, CV_W).astype(np.int8)
    bias_q = rng.integers(-5000, 5000, 6).astype(np.int32)
    za, zb = np.array(120, np.uint8), rng.integers(-3, 4, 6).astype(np.int8)
    sa, sb = np.array(0.04, np.float32), rng.uniform(0.001, 0.02, 6).astype(np.float32)
    y = rng.standard_normal(y_shape).astype(np.float32)
    rows = [(i, e, s, min(b, widths[0 if s < plan.k else 1] - 1)) for i, e, s, b in _conv_rows(plan.k, widths[1])]
    faults = dedupe(Faults.concat([hand_faults(plan, rows), sample_faults([plan], 2e-3, rng)]))
    check_operator("ConvFaults_int", gemm_inputs(plan, faults, qx, qw, y, bias=bias_q, quant=(za, zb, sa, sb)),
                   rtol=1e-5)


def test_gemm_faults_log_values_exact_fp32():
    """Single faults: the log holds the exact clean operation result and its flipped pattern."""
    rng = np.random.default_rng(9)
    site = make_site("gemm", "fp32", {"product": 32, "sum": 32})
    plan = gemm_plan(site, MM_A, MM_B, MM_Y)
    a = rng.standard_normal(MM_A).astype(np.float32)
    b = rng.standard_normal(MM_B).astype(np.float32)
    y = np.matmul(a, b)
    k = plan.k
    faults = hand_faults(plan, [(0, 2, 4, 30), (1, 9, k + 3, 31), (0, 6, 2 * k - 2, 17)])
    inputs = gemm_inputs(plan, faults, a, b, y)
    z, log = run_function("GemmFaults_fp32", inputs)
    # element (item 0, element 2): row 0, col 2 -> product a[0,0,4]*b[4,2]
    p = np.float32(a[0, 0, 4] * b[4, 2])
    out_index = _column(inputs, "out_index").tolist()
    f = out_index.index(2)
    assert log[f, 0] == p
    assert np.float32(log[f, 1]).view(np.uint32) == p.view(np.uint32) ^ np.uint32(1 << 30)


def test_batched_gemm_faults_fp32():
    """Activation x activation (attention): B has batch axes, columns are gathered from B^T."""
    rng = np.random.default_rng(11)
    a_shape, b_shape, y_shape = (2, 3, 5, 6), (2, 3, 6, 4), (2, 3, 5, 4)
    site = make_site("gemm", "fp32", {"product": 32, "sum": 32}, ranks=(4, 4, 4))
    plan = gemm_plan(site, a_shape, b_shape, y_shape)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    faults = _mm_faults(plan, rng, 5e-3)
    check_operator("BatchedGemmFaults_fp32", gemm_inputs(plan, faults, a, b, np.matmul(a, b)), rtol=1e-5,
                   perm=[0, 1, 3, 2])
