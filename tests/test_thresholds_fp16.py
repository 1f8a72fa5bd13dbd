"""float16 units under ``--precision fp16acc32`` (float16 storage, float32 accumulation:
passes/thresholds.py): adversarial fault-free inputs to onnxruntime's CPU float16 MatMul / Gemm /
Conv never raise a false alarm at any optimisation level; the bound's float16 output-rounding term
is needed (the float32 bound is exceeded on the same data); an error just above the bound is
detected, and recovered, where the worst-case float16 bound lets it through; and harden of a small
float16 model with the precision passes its equivalence check and recovers a corrupted product."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.passes.abft import abft
from onnxft.passes.thresholds import PRECISIONS, calibrated_tau, tau_bound, unit_precision

from models import perturbed as perturbed_unit
from models import run_cli

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
U16 = 2.0**-11


def f16(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT16, shape)


def _model(nodes, inputs, outputs, inits):
    return h.make_model(h.make_graph(nodes, "t", inputs, outputs, inits),
                        opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def linear(w, bias=None, m=4):
    """x [m, K] @ W [K, N] (+ bias), all float16."""
    K, N = w.shape
    nodes = [h.make_node("MatMul", ["x", "W"], ["y" if bias is None else "p"], name="fc")]
    inits = [nh.from_array(w.astype(np.float16), "W")]
    if bias is not None:
        nodes.append(h.make_node("Add", ["p", "b"], ["y"], name="fc_bias"))
        inits.append(nh.from_array(bias.astype(np.float16), "b"))
    return _model(nodes, [f16("x", [m, K])], [f16("y", [m, N])], inits)


def gemm(w, bias, alpha, beta):
    K, N = w.shape
    return _model([h.make_node("Gemm", ["x", "W", "b"], ["y"], name="g", transB=1, alpha=alpha, beta=beta)],
                  [f16("x", [4, K])], [f16("y", [4, N])],
                  [nh.from_array(w.T.astype(np.float16).copy(), "W"), nh.from_array(bias.astype(np.float16), "b")])


def act_matmul(M, K, N):
    return _model([h.make_node("MatMul", ["a", "b"], ["y"], name="ab")],
                  [f16("a", [2, M, K]), f16("b", [2, K, N])], [f16("y", [2, M, N])], [])


def conv(w, bias, hw=6):
    cout, cin = w.shape[:2]
    return _model([h.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                  [f16("x", [2, cin, hw, hw])], [f16("y", [2, cout, hw, hw])],
                  [nh.from_array(w.astype(np.float16), "W"), nh.from_array(bias.astype(np.float16), "B")])


def rounding_one_way(K=2048, N=64):
    """Every output sits just above 1 + 2^-11 of float16 in exact arithmetic: 1 + (2^-12 + 2^-13 +
    2^-14) + (K - 4) 2^-24. A sequential float32 accumulator at 1 swallows the 2^-24 terms (each half
    an ulp, ties to even), and float16 storage then rounds the rest down: every output of every row
    errs the same way, by about 0.9 x 2^-11 of its value (at K = 256: 79% of the fp16acc32 bound,
    13x float32's)."""
    w = np.full((K, N), 2.0**-24)
    w[0], w[1], w[2], w[3] = 1.0, 2.0**-12, 2.0**-13, 2.0**-14
    return linear(w), {"x": np.ones((4, K), np.float16)}


def cases():
    """(label, model, feeds): fault-free float16 inputs built to push the residual to the bound."""
    rng = np.random.default_rng(0)
    out = [("output rounding one way, K=2048",) + rounding_one_way()]
    # long K, all positive: every partial sum rounds the same way (|y| about 1e3, far from overflow)
    K, N = 4096, 64
    out.append(("K=4096 positive", linear(rng.uniform(0.5, 1.0, (K, N)) / 2, rng.uniform(0, 1, N)),
                {"x": rng.uniform(0.5, 1.0, (4, K)).astype(np.float16)}))
    # cancellation inside the dot products (x = [v, -v(1 + 2^-10)]) and across the row (W = [U, -U]),
    # a bias far larger than the products
    K, N = 1024, 256
    u = rng.standard_normal((K, N // 2))
    v = rng.standard_normal((4, K // 2)) * 4
    x = np.concatenate([v, -v * (1 + 2.0**-10)], 1).astype(np.float16)
    out.append(("cancellation, bias", linear(np.concatenate([u, -u * (1 + 2.0**-10)], 1), rng.standard_normal(N) * 300),
                {"x": x}))
    # widely spread magnitudes (1e-3 .. 1e2 in each operand), Gemm with transB, alpha and beta
    K, N = 768, 384
    w = rng.standard_normal((K, N)) * 10.0 ** rng.uniform(-3, 1, (K, N))
    x = (rng.standard_normal((4, K)) * 10.0 ** rng.uniform(-3, 1, (4, K))).astype(np.float16)
    out.append(("spread, Gemm transB alpha beta", gemm(w, rng.standard_normal(N) * 10, 0.37, 0.5), {"x": x}))
    # activation x activation (attention-like), cancelling columns
    a = rng.standard_normal((2, 16, 512)).astype(np.float16)
    b = rng.standard_normal((2, 512, 64)).astype(np.float16)
    b[:, :, 32:] = -b[:, :, :32]
    out.append(("activation x activation", act_matmul(16, 512, 64), {"a": a * 4, "b": b}))
    # Conv (K = 64 x 9) with a large bias against the products
    out.append(("conv", conv(rng.standard_normal((32, 64, 3, 3)) * 0.2, rng.standard_normal(32) * 100),
                {"x": rng.standard_normal((2, 64, 6, 6)).astype(np.float16)}))
    return out


CASES = cases()


def session(model, level="basic"):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, feeds, level="basic"):
    s = session(model, level)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


@pytest.mark.parametrize("label,model,feeds", CASES, ids=[c[0] for c in CASES])
def test_no_false_alarm_at_every_level(label, model, feeds):
    y = run(model, feeds)["y"]
    assert np.isfinite(y.astype(np.float32)).all()
    for scheme in ("standard", "lb"):
        r = abft(model, scheme=scheme, expose_flags=True, precision="fp16acc32")
        units = r.details["gemms"] + r.details.get("convs", [])
        assert units and all(u["precision"] == "fp16acc32" for u in units), units
        for level in LEVELS:
            outs = run(r.model, feeds, level)
            assert not any(bool(v) for k, v in outs.items() if k.endswith(".detected")), (scheme, level)


def test_output_rounding_term_is_needed():
    """On ``rounding_one_way`` the row sums of onnxruntime's float16 ``Y`` leave ``A (B e)`` by more
    than float32's whole bound and within fp16acc32's: float16 storage, not the accumulation, is what
    the bound must cover where the check reads the float16 result (onnxruntime's CPU provider hands
    the check the float32 result before the rounding: docs/abft.md, float16)."""
    model, feeds = rounding_one_way(K=256)
    w = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    x = feeds["x"].astype(np.float64)
    y = run(model, feeds, "all")["y"].astype(np.float32)
    K, N = w.shape
    ratio = np.abs(y.sum(1, dtype=np.float32) - x @ w.sum(1)) / (np.abs(x) @ np.abs(w).sum(1))
    assert ratio.max() > 10 * tau_bound(K, N, "fp32")
    assert ratio.max() < tau_bound(K, N, "fp16acc32")
    assert ratio.max() > 0.75 * tau_bound(K, N, "fp16acc32")  # the adversary reaches 3/4 of the bound


def test_fp16acc32_bound():
    """Leading order (3K + n + 2^13 (1 + e)) u; far below fp16's (whose float16 accumulation has
    no finite bound from K = 2048); float32 units under fp16acc32 are fp32."""
    u = 2.0**-24
    p = PRECISIONS["fp16acc32"]
    assert (p.u_in, p.u_acc, p.u_out, p.u_elt) == (0.0, 2 * u, U16, U16)
    for K, n, e in ((64, 64, 0), (384, 384, 1), (4096, 64, 1)):
        t = tau_bound(K, n, "fp16acc32", e)
        lead = (3 * K + n + 2**13 * (1 + e) + 2) * u
        assert lead < t < lead * 1.01
    assert tau_bound(384, 384, "fp16acc32", 1) < tau_bound(384, 384, "fp16", 1) / 200
    assert np.isfinite(tau_bound(8192, 64, "fp16acc32")) and tau_bound(2048, 64, "fp16") == float("inf")
    assert unit_precision("fp16acc32", fp16=True) is p and unit_precision("fp16acc32") is PRECISIONS["fp32"]
    # the default (tf32) and fp32 keep float16 accumulation for a float16 unit: the safe choice
    assert unit_precision("tf32", fp16=True).u_acc == U16 and unit_precision("fp32", fp16=True).u_acc == U16
    # calibration tightens a float32 unit under fp16acc32, as under fp32
    assert calibrated_tau(1e-8, 1e-3, "fp16acc32") == calibrated_tau(1e-8, 1e-3, "fp32") < 1e-3


def perturbed(hardened: onnx.ModelProto, unit: str = "g000") -> onnx.ModelProto:
    """``delta`` (a float16 graph input) added to the unit's output before its check reads it."""
    return perturbed_unit(hardened, unit, T.FLOAT16)


@pytest.mark.parametrize("with_bias", [False, True])
def test_error_just_above_the_bound_is_detected(with_bias):
    """One output of a K = N = 384 float16 projection (MiniLM's query) moved by 1.25 tau |A||B|e
    of its row: detected and recomputed under fp16acc32; the worst-case float16 bound (the default
    for float16 units) lets the same error through."""
    rng = np.random.default_rng(7)
    K = N = 384
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)
    bias = (rng.standard_normal(N) * 0.1).astype(np.float16) if with_bias else None
    model = linear(w, bias)
    x = rng.standard_normal((4, K)).astype(np.float16)
    clean = run(model, {"x": x})["y"].astype(np.float32)
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).sum(1)
    if with_bias:
        magnitude += np.abs(bias.astype(np.float64)).sum()
    hardened = {p: abft(model, scheme="standard", expose_flags=True, precision=p) for p in ("fp16acc32", "tf32")}
    tau = hardened["fp16acc32"].details["gemms"][0]["tau"]
    delta = np.zeros((4, N), np.float16)
    delta[2, 5] = np.float16(1.25 * tau * magnitude[2])
    detected = {}
    for prec, r in hardened.items():
        outs = run(perturbed(r.model), {"x": x, "delta": delta})
        detected[prec] = bool(outs["onnxft.abft.fc.detected"])
        if detected[prec]:  # the recovery recomputes the product: the error is gone
            np.testing.assert_allclose(outs["y"].astype(np.float32), clean, rtol=0,
                                       atol=4 * U16 * np.abs(clean).max())
    assert detected == {"fp16acc32": True, "tf32": False}
    assert hardened["tf32"].details["gemms"][0]["tau"] > 100 * tau


def small_fp16_model():
    """x [n, 32] -> Cast float16 -> MatMul 32x48 + bias -> Relu -> MatMul 48x16 -> Cast float32."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((32, 48)) * 0.2).astype(np.float16)
    b1 = (rng.standard_normal(48) * 0.1).astype(np.float16)
    w2 = (rng.standard_normal((48, 16)) * 0.2).astype(np.float16)
    g = h.make_graph([h.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16, name="in16"),
                      h.make_node("MatMul", ["xh", "w1"], ["p1"], name="fc1"),
                      h.make_node("Add", ["p1", "b1"], ["z1"], name="fc1_bias"),
                      h.make_node("Relu", ["z1"], ["a1"], name="relu"),
                      h.make_node("MatMul", ["a1", "w2"], ["p2"], name="fc2"),
                      h.make_node("Cast", ["p2"], ["y"], to=T.FLOAT, name="out32")],
                     "fp16", [h.make_tensor_value_info("x", T.FLOAT, ["n", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 16])],
                     [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_harden_fp16_model_with_fp16acc32(tmp_path, capsys):
    """``onnxft harden --precision fp16acc32``: equivalence on held-out items passes, both float16
    GEMMs get fp16acc32 thresholds (8x below the default's at K = 32, 48; 150x at 384), no alarm on
    fault-free items, and a corrupted product is detected and recovered."""
    rng = np.random.default_rng(4)
    onnx.save(small_fp16_model(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "m.npz", x=(rng.standard_normal((32, 32)) * 2).astype(np.float32))
    plans = {}
    for prec in ("fp16acc32", "tf32"):
        out = tmp_path / f"h_{prec}.onnx"
        code, text, err = run_cli(["harden", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "m.npz"), "-o",
                                   str(out), "--range", "none", "--precision", prec], capsys)
        assert code == 0, err
        plans[prec] = json.loads((tmp_path / f"h_{prec}.plan.json").read_text())
    plan = plans["fp16acc32"]
    v = plan["verification"]
    assert plan["precision"] == "fp16acc32" and v["in_range_max_rel_diff"] <= v["tolerance"]
    gemms = plan["gemms"]
    assert [g["precision"] for g in gemms] == ["fp16acc32", "fp16acc32"]
    default_taus = [g["tau"] for g in plans["tf32"]["gemms"]]
    assert all(g["tau"] * 8 < d for g, d in zip(gemms, default_taus))
    hardened = onnx.load(str(tmp_path / "h_fp16acc32.onnx"))
    onnx.checker.check_model(hardened, full_check=True)
    original = small_fp16_model()
    x = (rng.standard_normal((8, 32)) * 2).astype(np.float32)
    want = run(original, {"x": x}, "all")["y"]
    assert not any(bool(v) for k, v in run(hardened, {"x": x}, "all").items() if k.endswith(".detected"))
    for unit, shape in (("g000", (8, 48)), ("g001", (8, 16))):
        delta = np.zeros(shape, np.float16)
        delta[3, 7] = 8.0
        exposed = abft(onnx.load(str(tmp_path / "m.onnx")), expose_flags=True, precision="fp16acc32")
        outs = run(perturbed(exposed.model, unit), {"x": x, "delta": delta}, "all")
        assert any(bool(v) for k, v in outs.items() if k.endswith(".detected")), unit
        np.testing.assert_allclose(outs["y"], want, rtol=0, atol=8 * U16 * np.abs(want).max())


@pytest.mark.parametrize("precision", ["fp16acc32", "tf32"])
def test_fp16_gemm_alpha_beta_recovered(precision):
    """A float16 Gemm with transB, alpha and beta (the recovery scales the float32-cast weight by
    alpha: a float16 weight times a float32 alpha was a type error): a corrupted output is detected
    and the recomputed result matches the original's to float16 rounding."""
    rng = np.random.default_rng(9)
    model = gemm(rng.standard_normal((64, 32)) * 0.2, rng.standard_normal(32), 0.37, 0.5)
    x = rng.standard_normal((4, 64)).astype(np.float16)
    clean = run(model, {"x": x})["y"].astype(np.float32)
    r = abft(model, scheme="standard", expose_flags=True, precision=precision)
    onnx.checker.check_model(r.model, full_check=True)
    delta = np.zeros((4, 32), np.float16)
    delta[1, 3] = 30.0
    outs = run(perturbed(r.model), {"x": x, "delta": delta})
    assert bool(outs["onnxft.abft.g.detected"])
    np.testing.assert_allclose(outs["y"].astype(np.float32), clean, rtol=0, atol=4 * U16 * np.abs(clean).max())



@pytest.mark.parametrize("precision", ["fp16", "fp16acc32"])
def test_hardened_fp16_model_loads_without_onnxruntime_warnings(precision, capfd):
    """onnxruntime's CPU provider computes a float16 MatMul in float32 between Casts and then removes
    Cast pairs by renaming their readers; a recovery branch that read the main graph's Cast of Y as
    an implicit input could not be renamed, and every hardened float16 GEMM printed a warning at
    load ("Implicit input name ... cannot be safely updated"): 96 for the real fp16 MiniLM."""
    rng = np.random.default_rng(4)
    model = abft(linear(rng.standard_normal((16, 8)), bias=rng.standard_normal(8)), precision=precision).model
    capfd.readouterr()
    so = ort.SessionOptions()
    so.log_severity_level = 2  # warnings and above, onnxruntime's default
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": rng.standard_normal((4, 16)).astype(np.float16)})
    err = capfd.readouterr().err
    assert "cannot be safely updated" not in err and "W:onnxruntime" not in err, err[:300]
