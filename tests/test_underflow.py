"""The ABFT tests' absolute underflow term ``eta`` (``passes.thresholds.underflow_term``).

A result below its format's smallest normal number errs absolutely (float16: up to 2^-25 with
gradual underflow, 2^-14 flushed to zero), so no relative ``tau`` covers a row whose outputs
underflow. Here: a float16 MatMul/Gemm/activation product/Conv whose every output underflows, checked
where the check reads the float16-rounded result (as a GPU or ARM runtime hands it over), raises no
alarm under fp16 and fp16acc32 at any level, where ``tau`` alone flags it; the term bounds the
worst cases of exhaustive small products emulated in numpy (FTZ and gradual underflow, float16 and
float32) and is reached by them; the graph's run-time form is never below it; it is recorded in the
plan, kept under calibrated thresholds, and too small to hide a normal-range fault."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import samples
from onnxft.passes.abft import abft
from onnxft.passes.thresholds import PRECISIONS, precision, tau_bound, underflow_term, unit_precision

from models import perturbed

ort.set_default_logger_severity(3)
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
TINY16 = 2.0**-14


def _model(nodes, inputs, outputs, inits, elem=T.FLOAT16):
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info(n, elem, s) for n, s in inputs],
                     [h.make_tensor_value_info(n, elem, s) for n, s in outputs], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def run(model, feeds, level="basic"):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def rounded_first(hardened: onnx.ModelProto, unit: str = "g000") -> onnx.ModelProto:
    """The hardened model with a no-op ``Reshape`` between unit ``unit``'s result and everything
    that reads it: onnxruntime's CPU provider computes a float16 MatMul/Gemm/Conv in float32 and
    hands the float32 result to a float32 consumer (the check's Cast) when the two Casts meet, so
    the check never sees the float16 rounding; the Reshape (a real float16 kernel) makes the check
    read the float16 result, as a runtime with float16 kernels (GPU, ARM) does."""
    m = onnx.ModelProto()
    m.CopyFrom(hardened)
    raw = f"onnxft.abft.{unit}/unchecked"
    producer = next(n for n in m.graph.node if raw in n.output)
    producer.output[list(producer.output).index(raw)] = raw + "/float16"
    at = list(m.graph.node).index(producer) + 1
    m.graph.node.insert(at, h.make_node("Shape", [raw + "/float16"], ["test/same_shape"], name="test/shape"))
    m.graph.node.insert(at + 1, h.make_node("Reshape", [raw + "/float16", "test/same_shape"], [raw],
                                            name="test/rounded"))
    return m


# products 2^-13 x 2^-14 = 2^-27, four per output: every exact output is 2^-25, which float16
# rounds to 0 (a tie, to even); the row of N outputs loses N 2^-25, its whole |A| |B| e
K, N, M = 4, 8, 4
X = np.full((M, K), 2.0**-13, np.float16)


def linear():
    return _model([h.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [("x", [M, K])], [("y", [M, N])],
                  [nh.from_array(np.full((K, N), 2.0**-14, np.float16), "W")])


def gemm():
    return _model([h.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", transB=1)], [("x", [M, K])], [("y", [M, N])],
                  [nh.from_array(np.full((N, K), 2.0**-14, np.float16), "W"),
                   nh.from_array(np.zeros(N, np.float16), "C")])


def act_matmul():
    return _model([h.make_node("MatMul", ["a", "b"], ["y"], name="ab")], [("a", [2, M, K]), ("b", [2, K, N])],
                  [("y", [2, M, N])], [])


def conv():
    """1x1 Conv, 4 input channels of 2^-13, weights 2^-14: every output 2^-25, rounded to 0."""
    return _model([h.make_node("Conv", ["x", "W"], ["y"], name="conv")], [("x", [1, K, 3, 3])], [("y", [1, N, 3, 3])],
                  [nh.from_array(np.full((N, K, 1, 1), 2.0**-14, np.float16), "W")])


UNITS = {"MatMul": (linear, {"x": X}, "g000"), "Gemm": (gemm, {"x": X}, "g000"),
         "activation x activation": (act_matmul, {"a": np.full((2, M, K), 2.0**-13, np.float16),
                                                  "b": np.full((2, K, N), 2.0**-14, np.float16)}, "g000"),
         "Conv": (conv, {"x": np.full((1, K, 3, 3), 2.0**-13, np.float16)}, "c000")}


@pytest.mark.parametrize("label", list(UNITS))
@pytest.mark.parametrize("prec", ["fp16acc32", "fp16"])
def test_underflowing_float16_outputs_raise_no_alarm(label, prec):
    build, feeds, unit = UNITS[label]
    model = build()
    y = run(model, feeds)["y"]
    assert not y.any()  # every output rounded away
    for scheme in ("standard", "lb"):
        r = abft(model, scheme=scheme, block_size=4, expose_flags=True, precision=prec)
        entry = (r.details["gemms"] + r.details["convs"])[0]
        assert entry["precision"] == prec and entry["eta"] >= underflow_term(K, N, prec)
        # tau alone would flag it: the rounded row leaves its whole |A||B|e, far above tau |A||B|e
        magnitude = N * K * 2.0**-27
        assert entry["tau"] * magnitude < N * 2.0**-25 <= entry["eta"]
        flag = next(k for k in r.model.graph.output if k.name.endswith(".detected")).name
        for level in LEVELS:
            outs = run(rounded_first(r.model, unit), feeds, level)
            assert not bool(outs[flag]), (scheme, level)
            assert not outs["y"].any()


@pytest.mark.parametrize("prec", ["fp16acc32", "fp16"])
def test_recovery_tests_keep_eta(prec):
    """A real fault in one output of the underflowing MatMul (each row of the rank-2 product is a GEMM
    of its own): the row test fires, and the recovery's own tests (LB's block test, standard's
    column test), which read the same rounded result, flag only the faulty block (16 index writes;
    without eta all 8 blocks, 128) or the faulty element (1; without eta every matrix, 32); the
    output is the clean one."""
    for scheme, want in (("lb", 16), ("standard", 1)):
        r = abft(linear(), scheme=scheme, block_size=4, expose_flags=True, precision=prec)
        m = rounded_first(perturbed(r.model, elem_type=T.FLOAT16))
        delta = np.zeros((M, N), np.float16)
        delta[1, 5] = 1.0
        for level in ("disabled", "all"):
            outs = run(m, {"x": X, "delta": delta}, level)
            assert bool(outs["onnxft.abft.fc.detected"]) and int(outs["onnxft.abft.fc.recomputed"]) == want, (
                scheme, level, int(outs["onnxft.abft.fc.recomputed"]))
            assert not outs["y"].any()


def test_without_eta_the_rounded_check_flags():
    """The same graph with the absolute term taken out of the test (the scale's constant set back
    to tau's part alone) flags the underflowing row: the case is one the term is needed for."""
    r = abft(linear(), scheme="standard", expose_flags=True, precision="fp16acc32")
    m = rounded_first(r.model)
    eta_const = [i for i in m.graph.initializer if "/biasAbs" in i.name]
    assert len(eta_const) == 1 and float(nh.to_array(eta_const[0])) == pytest.approx(r.details["gemms"][0]["eta"])
    eta_const[0].CopyFrom(nh.from_array(np.float32(0), eta_const[0].name))
    assert bool(run(m, {"x": X})["onnxft.abft.fc.detected"])


# ---------------------------------------------------------------------------------------------
# the term against exhaustive small products


def _round(x, dtype, model, tiny):
    """``x`` (float64) rounded to ``dtype``: gradual underflow, or flushed to zero below ``tiny`` where
    ``model`` flushes that format ("ftz32": float32 only, the passes' model; "ftz": every format)."""
    y = x.astype(dtype).astype(np.float64)
    flush = model == "ftz" or (model == "ftz32" and tiny < TINY16)
    return np.where(np.abs(y) < tiny, 0.0, y) if flush else y


def _emulate(a, b, prec, model):
    """The test's two sides for ``a [P, K] @ b [P, K, N]`` as the precision computes them: the row
    sum of the outputs (sequential dot products; float16 products, sums and output for ``fp16``;
    float32 products and sums, float16 output for ``fp16acc32``; float32 throughout for ``fp32``;
    the row sum in float32) and ``ref = a (b e)`` in float32 (``b e`` rounded once, as offline)."""
    acc = {"fp16": np.float16, "fp16acc32": np.float32, "fp32": np.float32}[prec]
    tiny_acc = TINY16 if prec == "fp16" else 2.0**-126
    y = np.zeros((a.shape[0], b.shape[2]))
    for k in range(a.shape[1]):
        y = _round(y + _round(a[:, k, None] * b[:, k, :], acc, model, tiny_acc), acc, model, tiny_acc)
    if prec == "fp16acc32":
        y = _round(y, np.float16, model, TINY16)
    r = np.zeros(a.shape[0])
    for j in range(y.shape[1]):
        r = _round(r + y[:, j], np.float32, model, 2.0**-126)
    be = b.sum(2).astype(np.float32).astype(np.float64)
    ref = np.zeros(a.shape[0])
    for k in range(a.shape[1]):
        ref = _round(ref + _round(a[:, k] * be[:, k], np.float32, model, 2.0**-126), np.float32, model, 2.0**-126)
    return r, ref


# operand values whose products and sums land around the smallest normal number of the format
# (float16: products 0.19 .. 0.94 x 2^-14; float32: around 2^-126)
# (float16: products from a few 2^-24, ties of the subnormal grid, to 0.94 x 2^-14; float32 the
# same around 2^-149 and 2^-126; every operand a normal number)
VALUES = {"fp16": ([0, 1.5 * 2.0**-10, -1.5 * 2.0**-10, 1.25 * 2.0**-10, 0.5],
                   [0, TINY16, -TINY16, 1.25 * TINY16, -1.5 * TINY16]),
          "fp32": ([0, 1.5 * 2.0**-75, -1.5 * 2.0**-75, 1.25 * 2.0**-75], [0, 2.0**-74, -2.0**-74, 1.25 * 2.0**-52])}


# the share of eta the exhaustive worst case reaches, per underflow model ("ftz32": float32 flushed,
# float16 gradual, what the passes count; "gradual"; "ftz": float16 flushed too): the float16 output
# rounding, which dominates eta in float16 storage, is met almost exactly; with FTZ every product
# and every sum counts one smallest normal, which flushed products and sums do not both reach;
# float32's term is mostly the checksum and scale sides' roundings, which an exact-scale emulation
# cannot show
REACHED = {("fp16acc32", "ftz32"): 0.95, ("fp16acc32", "gradual"): 0.95, ("fp16acc32", "ftz"): 0.7,
           ("fp16", "ftz32"): 0.95, ("fp16", "gradual"): 0.95, ("fp16", "ftz"): 0.35,
           ("fp32", "ftz32"): 0.15, ("fp32", "gradual"): 0.35, ("fp32", "ftz"): 0.15}
TERM_ARGS = {"ftz32": {}, "gradual": {"ftz": False}, "ftz": {"ftz16": True}}


@pytest.mark.parametrize("prec", ["fp16acc32", "fp16", "fp32"])
@pytest.mark.parametrize("model", ["ftz32", "gradual", "ftz"])
def test_term_bounds_and_meets_exhaustive_worst_cases(prec, model):
    """Every A [1, 2] x B [2, 2] over a small value set, computed as ``prec`` computes it under an
    underflow model (``_emulate``): ``|r - ref|`` never exceeds ``tau |A||B|e + eta`` (with ``eta``
    the term for that model), tau alone is exceeded, and the worst case reaches ``REACHED`` of
    ``eta``."""
    k, n = 2, 2
    va, vb = VALUES["fp32" if prec == "fp32" else "fp16"]
    a = np.array(list(itertools.product(va, repeat=k)), np.float64)
    b = np.array(list(itertools.product(vb, repeat=k * n)), np.float64).reshape(-1, k, n)
    a, b = np.repeat(a, len(b), 0), np.tile(b, (len(va) ** k, 1, 1))  # every pair
    r, ref = _emulate(a, b, prec, model)
    magnitude = np.einsum("pk,pk->p", np.abs(a), np.abs(b).sum(2))
    tau, eta = tau_bound(k, n, prec), underflow_term(k, n, prec, **TERM_ARGS[model])
    excess = np.abs(r - ref) - tau * magnitude
    assert excess.max() <= eta
    assert excess.max() > 0  # a relative bound alone fails
    assert excess.max() >= REACHED[prec, model] * eta, (excess.max(), eta)
    if model == "ftz":
        assert eta > underflow_term(k, n, prec, ftz=False)


def test_term_per_precision():
    """The figures docs/abft.md quotes (K = 768; a block of 32 and a row of 768), FTZ > gradual, and
    the float32-exponent formats' terms below 1e-30."""
    for prec in ("fp32", "tf32", "bf16"):
        assert 0 < underflow_term(768, 32, prec) < 1e-32 and underflow_term(768, 768, prec) < 1e-30
    sub = TINY16 * 2.0**-11  # half an ulp of float16's subnormal grid: 2^-25
    eta = underflow_term(768, 32, "fp16acc32")
    assert 32 * 1.01 * sub > eta > 32 * sub  # gradual float16: the output rounding, 2^-25 per output, leads
    assert underflow_term(768, 32, "fp16acc32", extra_roundings=2) > 3 * 32 * sub * 0.99  # with a bias add
    assert underflow_term(768, 32, "fp16") > 768 * 32 * sub  # float16 accumulation: every product
    # flushed float16 (ftz16, not what the passes count) costs 2^-14 per output and per rounding
    assert 32 * 3 * TINY16 > underflow_term(768, 32, "fp16acc32", ftz16=True) > 32 * TINY16
    assert underflow_term(768, 32, "fp16", ftz16=True) > 2 * 768 * 32 * TINY16
    assert underflow_term(2048, 8, "fp16") == float("inf") == tau_bound(2048, 8, "fp16")
    p = unit_precision("tf32", fp16=True)
    assert p.tiny_acc == TINY16 and underflow_term(64, 8, p) >= underflow_term(64, 8, "fp16")
    assert PRECISIONS["fp16acc32"].tiny_acc == 2.0**-126 and precision("fp16acc32").tiny_out == TINY16


def test_graph_eta_equals_underflow_term():
    """The run-time term the graph computes (dynamic K or N) is ``underflow_term``: never below it,
    within 2^-17 above; +inf where no finite bound exists."""
    from onnxft.graph.checksums import Nodes
    from onnxft.passes.abft import _runtime_eta

    f32 = lambda name: h.make_tensor_value_info(name, T.FLOAT, [1])  # noqa: E731
    for prec in ("fp32", "tf32", "fp16", "fp16acc32", "bf16"):
        p = precision(prec)
        for extra, rc in ((0, False), (2, True)):
            for kind in ("both", "k", "n"):
                nb = Nodes("t", 17)
                k_in = "k" if kind != "n" else 197
                n_in = "n" if kind != "k" else 64
                out = _runtime_eta(nb, p, extra, rc, k_in, n_in)
                ins = [f32(x) for x in ("k", "n") if (x == "k" and kind != "n") or (x == "n" and kind != "k")]
                m = h.make_model(h.make_graph(nb.nodes, "t", ins, [f32(out)], nb.initializers),
                                 opset_imports=[h.make_opsetid("", 17)], ir_version=8)
                sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for K, n in ((1, 1), (4, 4), (197, 64), (768, 3072), (4096, 4096)):
                    K = K if kind != "n" else 197
                    n = n if kind != "k" else 64
                    feeds = {i.name: np.float32([K if i.name == "k" else n]) for i in ins}
                    got = float(sess.run([out], feeds)[0][0])
                    want = underflow_term(K, n, p, extra, rc)
                    if np.isinf(want):
                        assert np.isinf(got), (prec, K, n)
                    else:
                        assert want <= got <= want * (1 + 2.0**-17), (prec, extra, rc, kind, K, n, got, want)


def test_dynamic_attention_gets_runtime_eta():
    """Attention x V over a dynamic sequence: the graph's row test adds the run-time term, and
    float16 operands whose products underflow raise no alarm where the check reads the rounded
    result."""
    model = _model([h.make_node("MatMul", ["p", "v"], ["y"], name="pv")], [("p", [2, "s", "s"]), ("v", [2, "s", 8])],
                   [("y", [2, "s", 8])], [])
    r = abft(model, scheme="lb", block_size=4, expose_flags=True, precision="fp16acc32")
    assert r.details["gemms"][0]["tau_source"].startswith("rounding bound (run time")
    m = rounded_first(r.model)
    for s in (4, 6):
        feeds = {"p": np.full((2, s, s), 2.0**-13, np.float16), "v": np.full((2, s, 8), 2.0**-14, np.float16)}
        for level in ("disabled", "all"):
            outs = run(m, feeds, level)
            assert not bool(outs["onnxft.abft.pv.detected"]), (s, level)
            np.testing.assert_array_equal(outs["y"], run(model, feeds, level)["y"])


# ---------------------------------------------------------------------------------------------
# detection of normal-range faults is unchanged


def test_eta_does_not_hide_normal_range_faults():
    """On the sample ViT every GEMM's eta is below 1e-30 (fp32), against row magnitudes of order 1;
    an exponent flip (bit 30) of one output of two GEMMs (the first QKV projection, an MLP Linear)
    is detected and recovered with eta in the test."""
    model = onnx.load(samples.sample_model("vit")["path"])
    name = model.graph.input[0].name
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    clean = run(model, {name: x})
    out = model.graph.output[0].name
    r = abft(model, scheme="lb", expose_flags=True, precision="fp32")
    gemms = r.details["gemms"]
    assert all(0 < g["eta"] < 1e-30 and 0 < g["eta_recovery"] < 1e-30 for g in gemms)
    assert all(0 < c["eta"] < 1e-30 for c in r.details["convs"])
    for i in (0, 4):
        m = perturbed(r.model, i)
        raw = f"onnxft.abft.g{i:03d}/unchecked/clean"
        m.graph.output.append(h.make_tensor_value_info(raw, T.FLOAT, None))
        flag = f"onnxft.abft.{gemms[i]['name']}.detected"
        base = run(m, {name: x, "delta": np.zeros(1, np.float32)})
        assert not bool(base[flag])
        y = base[raw]
        delta = np.zeros_like(y)
        with np.errstate(invalid="ignore", over="ignore"):
            delta.reshape(-1)[7] = (y.reshape(-1)[7:8].view(np.uint32) ^ np.uint32(1 << 30)).view(np.float32)[0] \
                - y.reshape(-1)[7]
        outs = run(m, {name: x, "delta": delta})
        assert bool(outs[flag]), i
        np.testing.assert_allclose(outs[out], clean[out], rtol=1e-5, atol=1e-5)


def test_calibration_keeps_eta():
    """Calibrated thresholds tighten tau only: the plan's eta is the rounding bound's, the test's
    constant still holds it, and a row of float32 products near 2^-149 (every operand normal; the
    products' subnormal rounding leaves a residual far above tau |A||B|e) in the calibration data
    does not push tau up to the bound, as it would if calibration divided the whole residual."""
    from onnxft.campaigns.calibrate_abft import calibrate_abft

    rng = np.random.default_rng(1)
    K, N = 256, 64
    w = (rng.standard_normal((K, N)) * 2.0**-23).astype(np.float32)
    model = _model([h.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [("x", ["m", K])], [("y", ["m", N])],
                   [nh.from_array(w, "W")], elem=T.FLOAT)
    x = (rng.standard_normal((32, K)) * 1e4).astype(np.float32)
    x[3] = np.sign(rng.standard_normal(K)) * 2.0**-126  # products of order 2^-149
    probe = abft(model, scheme="standard", unit_scale=True, precision="fp32")
    g = probe.details["gemms"][0]
    m = probe.model
    m.graph.output.extend([h.make_tensor_value_info(g[k], T.FLOAT, None) for k in ("residual", "scale")])
    outs = run(m, {"x": x})
    ratio = np.abs(outs[g["residual"]][3]) / outs[g["scale"]][3]
    bound = tau_bound(K, N, "fp32")
    assert ratio > bound and np.abs(outs[g["residual"]][3]) <= g["eta"]  # an underflow residual, eta's
    cal = calibrate_abft(model, [{"x": x}], precision="fp32")
    assert cal["fc"]["tau"] < bound / 4
    r = abft(model, scheme="lb", thresholds=cal, precision="fp32", expose_flags=True)
    g = r.details["gemms"][0]
    assert g["tau_source"] == "calibrated" and g["eta"] == underflow_term(K, N, "fp32") > 0
    assert not bool(run(r.model, {"x": x})["onnxft.abft.fc.detected"])


def test_nested_bodies_and_convs_carry_eta():
    """GEMMs inside If/Loop bodies (``abft_nested``) get the same term as main-graph ones, for
    their own K, N and bias; a Conv's entry records its own."""
    from onnxft.passes.abft_nested import abft_nested
    from test_abft_nested import control_flow_model

    r = abft_nested(control_flow_model(), scheme="lb", block_size=4, precision="fp16acc32")
    nested = {g["name"]: g for g in r.details["gemms"] if g.get("graph")}
    assert set(nested) == {"then_mm", "else_mm", "loop_mm"}
    for name, g in nested.items():
        extra = 2 if name == "then_mm" else 0  # (the bias add and its rounding)
        assert g["eta"] == underflow_term(g["K"], g["N"], "fp32", extra) > 0  # (float32 units: fp32)
        # (the LB branch sums the weight's column blocks at run time: run-time-checksum counts)
        assert g["eta_recovery"] == underflow_term(g["K"], g["block_size"], "fp32", extra, True) > 0
    c = abft(conv(), precision="fp16acc32").details["convs"][0]
    assert c["eta"] == underflow_term(K, N, "fp16acc32") > N * TINY16 * 2.0**-11


def _fp32_subnormal_products():
    """x [4, 64] @ W [64, 32] in float32, row 1 of x = +-2^-126 and W of order 2^-23: that row's
    products are of order 2^-149, where float32's gradual underflow rounds each by up to 2^-150,
    a large part of its size, on onnxruntime's CPU provider too (every operand a normal number):
    the row's residual is 1.6% of its |A||B|e, 1700 x fp32's tau."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 32)) * 2.0**-23).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1] = np.sign(rng.standard_normal(64)) * 2.0**-126
    model = _model([h.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [("x", [4, 64])], [("y", [4, 32])],
                   [nh.from_array(w, "W")], elem=T.FLOAT)
    return model, {"x": x}


@pytest.mark.parametrize("scheme,impl", [("lb", "global"), ("lb", "fused"), ("standard", "global")])
def test_float32_subnormal_products_raise_no_alarm(scheme, impl):
    """Float32 needs the term too (about 1e-35 here): products in the subnormal range leave a
    residual above fp32's tau |A||B|e (the test case flags without eta), under every
    implementation that compares against a threshold; the output is untouched."""
    model, feeds = _fp32_subnormal_products()
    r = abft(model, scheme=scheme, impl=impl, block_size=8, expose_flags=True, precision="fp32")
    assert r.details["gemms"][0]["impl"] == impl
    for level in LEVELS:
        outs = run(r.model, feeds, level)
        assert not bool(outs["onnxft.abft.fc.detected"]), level
        np.testing.assert_array_equal(outs["y"], run(model, feeds, level)["y"])
