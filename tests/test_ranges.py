"""Range restriction: site finding (each GELU form), bounds, calibration, and the pass's semantics
against numpy, at several opsets, on stock onnxruntime."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import samples
from onnxft.campaigns.calibrate_ranges import CalibrationError, calibrate_ranges, dataset_batches
from onnxft.graph.roles import PROTECTION, role_of, set_role
from onnxft.faults.sites import SiteTable
from onnxft.passes.inject import SiteSelection, inject, prepare
from onnxft.passes.ranges import (GELU_MIN, RangeError, find_range_sites, range_bounds, restrict_ranges,
                                  site_bounds)
from onnxft.runtime.data import input_specs, load_npz
from onnxft.runtime.session import make_session

from models import tiny_cnn, tiny_transformer

ERF = np.vectorize(math.erf)


@np.errstate(invalid="ignore")  # -inf * 0 at x = -inf
def gelu_erf(x):
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


@np.errstate(invalid="ignore")
def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def c(name, value):
    return nh.from_array(np.array(value, np.float32), name)


def model_of(nodes, inits, opset=17, out="y", dims=(2, 5), extra_outputs=()):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(dims))],
                     [h.make_tensor_value_info(o, T.FLOAT, list(dims)) for o in (out, *extra_outputs)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def run(model, x, outputs=None):
    return make_session(model, "cpu").run(outputs, {"x": x})


# GELU forms: each builds y = GELU(x) from a pre-activation p = x + 0 (so x has several readers, as
# a real pre-activation does). Node names say where each node sits.
def _pre():
    return [h.make_node("Add", ["x", "zero"], ["p"], name="fc/Add")], [c("zero", 0.0)]


def erf_torch():  # Div by sqrt2, Mul(x, 1+erf), then Mul 0.5 (torch.nn.GELU export)
    pre, inits = _pre()
    return pre + [h.make_node("Div", ["p", "sqrt2"], ["d"], name="act/Div"), h.make_node("Erf", ["d"], ["e"], name="act/Erf"),
                  h.make_node("Add", ["e", "one"], ["u"], name="act/Add"), h.make_node("Mul", ["p", "u"], ["m"], name="act/Mul"),
                  h.make_node("Mul", ["m", "half"], ["y"], name="act/Mul_1")], \
        inits + [c("sqrt2", math.sqrt(2)), c("one", 1.0), c("half", 0.5)]


def erf_half_first():  # Mul by 1/sqrt2; 0.5*x computed first, then times (1+erf); constants as Constant nodes
    pre, inits = _pre()
    consts = [h.make_node("Constant", [], [n], value=nh.from_array(np.array(v, np.float32)), name=f"const/{n}")
              for n, v in (("rs2", 1 / math.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    return pre + consts + [h.make_node("Mul", ["rs2", "p"], ["d"], name="act/Mul_s"), h.make_node("Erf", ["d"], ["e"], name="act/Erf"),
                           h.make_node("Add", ["one", "e"], ["u"], name="act/Add"), h.make_node("Mul", ["half", "p"], ["hx"], name="act/Mul_h"),
                           h.make_node("Mul", ["hx", "u"], ["y"], name="act/Mul")], inits


def erf_half_on_bracket():  # 0.5*(1+erf) first, then times x
    pre, inits = _pre()
    return pre + [h.make_node("Mul", ["p", "rs2"], ["d"], name="act/Mul_s"), h.make_node("Erf", ["d"], ["e"], name="act/Erf"),
                  h.make_node("Add", ["e", "one"], ["u"], name="act/Add"), h.make_node("Mul", ["u", "half"], ["hu"], name="act/Mul_h"),
                  h.make_node("Mul", ["p", "hu"], ["y"], name="act/Mul")], \
        inits + [c("rs2", 1 / math.sqrt(2)), c("one", 1.0), c("half", 0.5)]


def tanh_pow():  # torch approximate='tanh' / keras: Pow(x, 3)
    pre, inits = _pre()
    return pre + [h.make_node("Pow", ["p", "three"], ["x3"], name="act/Pow"), h.make_node("Mul", ["x3", "k"], ["kx3"], name="act/Mul_k"),
                  h.make_node("Add", ["p", "kx3"], ["inner"], name="act/Add_in"), h.make_node("Mul", ["inner", "s"], ["t0"], name="act/Mul_s"),
                  h.make_node("Tanh", ["t0"], ["t"], name="act/Tanh"), h.make_node("Add", ["t", "one"], ["u"], name="act/Add"),
                  h.make_node("Mul", ["p", "half"], ["hx"], name="act/Mul_h"), h.make_node("Mul", ["hx", "u"], ["y"], name="act/Mul")], \
        inits + [c("three", 3.0), c("k", 0.044715), c("s", math.sqrt(2 / math.pi)), c("one", 1.0), c("half", 0.5)]


def tanh_mul_cube():  # x*x*x by Muls, constant folded as x*(s + s*k*x^2) is NOT this form: keep the textbook one
    pre, inits = _pre()
    return pre + [h.make_node("Mul", ["p", "p"], ["x2"], name="act/Mul_sq"), h.make_node("Mul", ["x2", "p"], ["x3"], name="act/Mul_cube"),
                  h.make_node("Mul", ["k", "x3"], ["kx3"], name="act/Mul_k"), h.make_node("Add", ["kx3", "p"], ["inner"], name="act/Add_in"),
                  h.make_node("Mul", ["s", "inner"], ["t0"], name="act/Mul_s"), h.make_node("Tanh", ["t0"], ["t"], name="act/Tanh"),
                  h.make_node("Add", ["one", "t"], ["u"], name="act/Add"), h.make_node("Mul", ["u", "p"], ["m"], name="act/Mul"),
                  h.make_node("Mul", ["half", "m"], ["y"], name="act/Mul_1")], \
        inits + [c("k", 0.044715), c("s", math.sqrt(2 / math.pi)), c("one", 1.0), c("half", 0.5)]


@pytest.mark.parametrize("build,reference", [(erf_torch, gelu_erf), (erf_half_first, gelu_erf),
                                             (erf_half_on_bracket, gelu_erf), (tanh_pow, gelu_tanh),
                                             (tanh_mul_cube, gelu_tanh)])
def test_gelu_forms_found(build, reference):
    nodes, inits = build()
    m = model_of(nodes, inits)
    x = np.linspace(-5, 5, 10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_allclose(run(m, x)[0], reference(x.astype(np.float64)), rtol=1e-5, atol=1e-6)  # the graph is a GELU
    sites = find_range_sites(m)
    gelu = [s for s in sites if s.kind == "gelu"]
    assert [s.tensor for s in gelu] == ["y"]
    assert gelu[0].fixed is None and gelu[0].known_min == GELU_MIN
    assert "fc/Add" not in gelu[0].nodes and any("Erf" in n or "Tanh" in n for n in gelu[0].nodes)
    # with tanh asked for too, the GELU's inner Tanh is not restricted on its own
    if build in (tanh_pow, tanh_mul_cube):
        both = find_range_sites(m, extra=["tanh"])
        assert [s.kind for s in both] == ["gelu"]
        assert any("Tanh inside a GELU" in why for _, why in both.skipped)


def test_fused_gelu_opset20_found_and_restricted():
    for approximate in ("none", "tanh"):
        m = model_of([h.make_node("Gelu", ["x"], ["y"], approximate=approximate, name="act/Gelu")], [], opset=20)
        sites = find_range_sites(m)
        assert [(s.tensor, s.kind, s.nodes) for s in sites] == [("y", "gelu", ("act/Gelu",))]
        r = restrict_ranges(m, site_bounds(sites, {"y": (-0.1, 2.0)}), "clamp", sites)
        onnx.checker.check_model(r.model, full_check=True)
        x = np.array([[-1, 0, 1, 2, 50], [np.nan, np.inf, -np.inf, 1e30, -0.75]], np.float32)
        ref = (gelu_erf if approximate == "none" else gelu_tanh)(x.astype(np.float64))
        lo, hi = GELU_MIN * 1.02, 2.0 * 1.02
        want = np.where(np.isnan(ref), 0.0, np.clip(ref, lo, hi))
        np.testing.assert_allclose(run(r.model, x)[0], want, rtol=1e-5, atol=1e-6)


def test_not_gelu_is_reported_with_reasons():
    nodes = [h.make_node("Mul", ["x", "two"], ["d"], name="act/Mul_s"), h.make_node("Erf", ["d"], ["e"], name="act/Erf"),
             h.make_node("Add", ["e", "one"], ["u"], name="act/Add"), h.make_node("Mul", ["x", "u"], ["y"], name="act/Mul")]
    m = model_of(nodes, [c("two", 2.0), c("one", 1.0)])
    sites = find_range_sites(m)
    assert list(sites) == []
    reasons = dict(sites.skipped)
    assert "argument is not x/sqrt(2)" in reasons["act/Erf"]
    assert "no Softmax" in reasons["softmax"] and "no GELU" in reasons["gelu"]
    # right argument, but no 0.5 factor
    nodes[0] = h.make_node("Div", ["x", "sqrt2"], ["d"], name="act/Div")
    m = model_of(nodes, [c("sqrt2", math.sqrt(2)), c("one", 1.0)])
    assert "no Mul chain computing 0.5" in dict(find_range_sites(m).skipped)["act/Erf"]


def test_no_softmax_or_gelu_gives_empty_result_with_reasons():
    m = tiny_cnn()
    sites = find_range_sites(m)
    assert list(sites) == [] and {k for k, _ in sites.skipped} >= {"softmax", "gelu"}
    r = restrict_ranges(m, site_bounds(sites), "clamp", sites)
    assert r.inserted == [] and r.skipped == sites.skipped
    assert len(r.model.graph.node) == len(m.graph.node)


def test_softmax_fixed_and_logsoftmax_skipped():
    m = model_of([h.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm"),
                  h.make_node("LogSoftmax", ["x"], ["z"], axis=-1, name="lsm")], [], extra_outputs=("z",))
    sites = find_range_sites(m)
    assert [(s.tensor, s.kind, s.fixed) for s in sites] == [("y", "softmax", (0.0, 1.0))]
    assert "unbounded below" in dict(sites.skipped)["lsm"]


def test_extra_kinds_relu_layernorm_sigmoid_tanh():
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("Sigmoid", ["r"], ["s"], name="sig"),
             h.make_node("Tanh", ["s"], ["t"], name="tanh"),
             # decomposed LayerNorm: (x - mean) / sqrt(var + eps) * g + b
             h.make_node("ReduceMean", ["t"], ["mu"], axes=[-1], name="ln/ReduceMean"),
             h.make_node("Sub", ["t", "mu"], ["xc"], name="ln/Sub"), h.make_node("Mul", ["xc", "xc"], ["sq"], name="ln/Mul_sq"),
             h.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="ln/ReduceMean_1"),
             h.make_node("Add", ["var", "eps"], ["ve"], name="ln/Add_eps"), h.make_node("Sqrt", ["ve"], ["sd"], name="ln/Sqrt"),
             h.make_node("Div", ["xc", "sd"], ["nrm"], name="ln/Div"), h.make_node("Mul", ["nrm", "g"], ["sc"], name="ln/Mul"),
             h.make_node("Add", ["sc", "b"], ["y"], name="ln/Add")]
    m = model_of(nodes, [c("eps", 1e-5), nh.from_array(np.ones(5, np.float32), "g"), nh.from_array(np.zeros(5, np.float32), "b")])
    assert list(find_range_sites(m)) == []
    sites = find_range_sites(m, extra=["relu", "layernorm", "sigmoid", "tanh"])
    assert [(s.tensor, s.kind, s.fixed) for s in sites] == [
        ("r", "relu", None), ("s", "sigmoid", (0.0, 1.0)), ("t", "tanh", (-1.0, 1.0)), ("y", "layernorm", None)]
    assert sites[-1].nodes[-1] == "ln/Add"
    assert [s.tensor for s in find_range_sites(m, kinds=(), extra=["all"])] == ["r", "s", "t", "y"]
    with pytest.raises(RangeError, match="unknown range kind"):
        find_range_sites(m, extra=["swish"])


def test_range_bounds_rules():
    stats = {"a": (-2.0, 10.0), "b": (1.0, 4.0), "c": (-5.0, -1.0)}
    widen = range_bounds(stats, 0.02)
    flat = lambda d: [v for k in sorted(d) for v in d[k]]  # noqa: E731
    assert flat(widen) == pytest.approx([-2.04, 10.2, 0.98, 4.08, -5.1, -0.98])
    for t, (lo, hi) in stats.items():  # widen always contains the calibrated range
        assert widen[t][0] <= lo and widen[t][1] >= hi
    paper = range_bounds(stats, 0.02, rule="paper")
    assert flat(paper) == pytest.approx([-2.04, 9.8, 1.02, 3.92, -5.1, -0.98])
    with pytest.raises(RangeError):
        range_bounds({"a": (float("nan"), 1.0)})
    with pytest.raises(RangeError, match="unknown bound rule"):
        range_bounds(stats, rule="magic")


def test_site_bounds_gelu_lower_bound_is_the_functions_minimum():
    m = model_of(*erf_torch())
    sites = find_range_sites(m)
    # calibration data that never reached GELU's dip (min -0.05) must not clip it on other data
    b = site_bounds(sites, {"y": (-0.05, 3.0)})
    assert b["y"] == pytest.approx((GELU_MIN * 1.02, 3.06))
    x = np.linspace(-3, 3, 10001)
    assert gelu_erf(x).min() > b["y"][0] and gelu_tanh(x).min() > b["y"][0]
    with pytest.raises(RangeError, match="no calibrated range"):
        site_bounds(sites, {})


X_SPECIAL = np.array([[np.nan, np.inf, -np.inf, 3.4e38, -3.4e38], [-2.0, -0.5, 0.0, 0.7, 1.5]], np.float32)


def _expected(x, lo, hi, mode):
    if mode == "clamp":
        return np.where(np.isnan(x), min(max(0.0, lo), hi), np.clip(x, lo, hi)).astype(np.float32)
    return np.where((x >= lo) & (x <= hi), x, 0.0).astype(np.float32)


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 20])
@pytest.mark.parametrize("mode", ["clamp", "zero"])
def test_restrict_semantics_vs_numpy_across_opsets(opset, mode):
    # Identity producer; y is both consumed (by Neg) and a graph output: both see the restricted value.
    m = model_of([h.make_node("Identity", ["x"], ["y"], name="act"), h.make_node("Neg", ["y"], ["z"], name="neg")],
                 [], opset=opset, extra_outputs=("z",))
    for lo, hi in ((-1.0, 1.0), (0.5, 1.5), (-0.5, 0.0)):
        r = restrict_ranges(m, {"y": (lo, hi)}, mode)
        onnx.checker.check_model(r.model, full_check=True)
        assert [o.name for o in r.model.graph.output] == ["y", "z"]
        assert len(r.model.graph.node) - len(m.graph.node) == r.details["nodes_inserted"] <= 4
        assert all(role_of(n) == PROTECTION for n in r.model.graph.node if n.name not in ("act", "neg"))
        y, z = run(r.model, X_SPECIAL)
        want = _expected(X_SPECIAL.astype(np.float64), lo, hi, mode)
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(z, -want)
        assert np.isfinite(y).all() and (y >= min(lo, 0 if mode == "zero" else lo)).all()


def test_restrict_float16_and_exact_bounds():
    # Softmax outputs hit exactly 0 and 1: inclusive bounds keep them in zero mode.
    g = h.make_graph([h.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT16, [1, 3])], [h.make_tensor_value_info("y", T.FLOAT16, [1, 3])])
    for opset in (9, 13):
        m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
        sites = find_range_sites(m)
        for mode in ("zero", "clamp"):
            r = restrict_ranges(m, site_bounds(sites), mode, sites)
            onnx.checker.check_model(r.model, full_check=True)
            x = np.array([[0.0, 0.0, 100.0]], np.float16)
            np.testing.assert_array_equal(make_session(r.model, "cpu").run(None, {"x": x})[0],
                                          np.array([[0, 0, 1]], np.float16))
            # a restricted model's own range nodes and restricted tensors are not found again
            again = find_range_sites(r.model, extra=["all"])
            assert list(again) == [] and any("already range-restricted" in why for _, why in again.skipped)


def test_pass_is_pure_and_checks_its_arguments():
    m = model_of(*erf_torch())
    before = m.SerializeToString()
    r = restrict_ranges(m, {"y": (-0.2, 5.0), "nope": (0.0, 1.0)}, "zero")
    assert m.SerializeToString() == before and r.model is not m
    assert "nope" in dict(r.skipped)
    with pytest.raises(RangeError, match="unknown range mode"):
        restrict_ranges(m, {"y": (0, 1)}, "wrap")
    with pytest.raises(RangeError, match="finite"):
        restrict_ranges(m, {"y": (1.0, 0.0)})
    old = model_of(*erf_torch(), opset=8)
    with pytest.raises(RangeError, match="opset >= 9"):
        restrict_ranges(old, {"y": (0, 1)})


def test_calibrate_ranges_matches_numpy_and_streams():
    m = model_of(*erf_torch())
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 5)).astype(np.float32) * s for s in (1, 3, 0.5)]
    stats = calibrate_ranges(m, ({"x": b} for b in batches), ["y", "d"])
    ys = np.concatenate([run(m, b, ["y"])[0] for b in batches])
    ds = np.concatenate(batches) / np.float32(math.sqrt(2))
    # extra outputs can change ORT's fusions (Gelu), hence a float32-rounding tolerance
    assert stats["y"] == pytest.approx((float(ys.min()), float(ys.max())), rel=1e-6)
    assert stats["d"] == pytest.approx((float(ds.min()), float(ds.max())), rel=1e-6)
    # non-finite values are left out
    bad = batches[0].copy()
    bad[0, 0] = np.nan
    bad[0, 1] = np.inf
    s2 = calibrate_ranges(m, [{"x": bad}], ["y"])
    finite = run(m, bad, ["y"])[0]
    finite = finite[np.isfinite(finite)]
    assert s2["y"] == pytest.approx((float(finite.min()), float(finite.max())), rel=1e-6)
    with pytest.raises(CalibrationError, match="not produced"):
        calibrate_ranges(m, [{"x": bad}], ["missing"])
    with pytest.raises(CalibrationError, match="no calibration batches"):
        calibrate_ranges(m, [], ["y"])


@pytest.fixture(scope="module")
def vit():
    m = onnx.load(samples.sample_model("vit")["path"])
    data = load_npz(samples.sample_data_path(), input_specs(m)).head(256)
    return m, data


def test_sample_vit_sites_and_fault_free_equivalence(vit):
    m, data = vit
    sites = find_range_sites(m)
    kinds = [s.kind for s in sites]
    assert kinds.count("softmax") == 6 and kinds.count("gelu") == 6 and len(sites) == 12
    assert all(s.tensor.endswith("mlp/act/Mul_1_output_0") for s in sites if s.kind == "gelu")
    stats = calibrate_ranges(m, dataset_batches(data, 64), sites.needing_calibration())
    bounds = site_bounds(sites, stats)
    base = make_session(m, "cpu").run(None, data.inputs)[0]
    for mode in ("clamp", "zero"):
        r = restrict_ranges(m, bounds, mode, sites)
        onnx.checker.check_model(r.model, full_check=True)
        assert r.model.opset_import[0].version == m.opset_import[0].version
        assert r.details["nodes_inserted"] == 3 * 12
        np.testing.assert_array_equal(make_session(r.model, "cpu").run(None, data.inputs)[0], base)


def test_sample_vit_int8_restricts_and_stays_exact():
    m = onnx.load(samples.sample_model("vit_int8")["path"])
    data = load_npz(samples.sample_data_path(), input_specs(m)).head(64)
    sites = find_range_sites(m)
    assert [s.kind for s in sites] == ["softmax"] * 6
    assert sum("QDQ model" in why for _, why in sites.skipped) == 6  # the quantized GELUs, with the reason
    r = restrict_ranges(m, site_bounds(sites), "clamp", sites)
    onnx.checker.check_model(r.model, full_check=True)
    # Exact at ORT level basic (what campaigns run). At level all the restriction keeps ORT from fusing
    # DQ-Softmax-Q into its integer kernel, so only the predictions are compared there.
    run_at = lambda model, level: make_session(model, "cpu", level=level).run(None, data.inputs)[0]  # noqa: E731
    np.testing.assert_array_equal(run_at(r.model, "basic"), run_at(m, "basic"))
    np.testing.assert_array_equal(run_at(r.model, "all").argmax(1), run_at(m, "all").argmax(1))


def test_inject_does_not_fault_protection_nodes():
    m = tiny_transformer()
    sites = find_range_sites(m)
    assert [s.kind for s in sites] == ["softmax", "gelu"]
    r = restrict_ranges(m, site_bounds(sites, {sites[1].tensor: (-0.2, 4.0)}), "clamp", sites)
    prepared = prepare(r.model)  # opset 17 -> 26: roles must survive the upgrade
    inserted = [n for n in prepared.graph.node if "/range/" in n.name]
    assert len(inserted) == 6 and all(role_of(n) == PROTECTION for n in inserted)
    plain = {s.node for s in _sites(m)}
    assert {s.node for s in _sites(r.model)} == plain
    assert not any("/range/" in s.node for s in _sites(r.model, SiteSelection(include_protection=True)))
    # the role mechanism itself: a protection-role Add is a site only with include_protection
    marked = onnx.ModelProto()
    marked.CopyFrom(m)
    set_role(next(n for n in marked.graph.node if n.name == "/blocks.0/Add"), PROTECTION)
    assert "/blocks.0/Add" not in {s.node for s in _sites(marked)}
    assert "/blocks.0/Add" in {s.node for s in _sites(marked, SiteSelection(include_protection=True))}


def _sites(model, sel=None):
    from onnxft.faults.sites import SiteTable
    res = inject(model, sel)
    return SiteTable.from_model(res.model).sites


def test_subgraph_consumers_read_the_restricted_value():
    # an If branch reads the Softmax output from the outer scope
    branch = lambda name, op: h.make_graph([h.make_node(op, ["y"], [f"{name}_out"])], name, [],  # noqa: E731
                                           [h.make_tensor_value_info(f"{name}_out", T.FLOAT, [1, 3])])
    nodes = [h.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm"),
             h.make_node("If", ["cond"], ["z"], then_branch=branch("then", "Identity"), else_branch=branch("else", "Neg"),
                         name="if")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3]), h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("z", T.FLOAT, [1, 3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    sites = find_range_sites(m)
    r = restrict_ranges(m, {"y": (0.0, 0.5)}, "clamp", sites)
    onnx.checker.check_model(r.model, full_check=True)
    x = np.array([[0.0, 0.0, 10.0]], np.float32)
    sm = np.exp(x) / np.exp(x).sum()
    z = make_session(r.model, "cpu").run(None, {"x": x, "cond": np.array(True)})[0]
    np.testing.assert_allclose(z, np.clip(sm, 0, 0.5), rtol=1e-6)


def test_quantized_sites_bounds_and_zero_mode():
    """``quantized``: arithmetic outputs that feed a QuantizeLinear, bounded by its representable
    range (or the calibrated one where wider); zero mode sends out-of-range values to 0, leaves
    fault-free outputs exact, and an injected out-of-range value is zeroed, not saturated."""
    q_scale, q_zp = 0.05, 3
    g = h.make_graph(
        [h.make_node("Add", ["x", "b"], ["s"], name="add"),
         h.make_node("QuantizeLinear", ["s", "sc", "zp"], ["q"], name="q"),
         h.make_node("DequantizeLinear", ["q", "sc", "zp"], ["out"], name="dq"),
         h.make_node("Reshape", ["x", "shp"], ["r"], name="reshape"),
         h.make_node("QuantizeLinear", ["r", "sc", "zp"], ["q2"], name="q_moves_only"),
         h.make_node("DequantizeLinear", ["q2", "sc", "zp"], ["out2"], name="dq2")],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 4])],
        [h.make_tensor_value_info("out", T.FLOAT, ["n", 4]), h.make_tensor_value_info("out2", T.FLOAT, ["n", 4])],
        [nh.from_array(np.float32([0.5, -0.5, 1.0, 0.0]), "b"), nh.from_array(np.float32(q_scale), "sc"),
         nh.from_array(np.int8(q_zp), "zp"), nh.from_array(np.int64([-1, 4]), "shp")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    sites = find_range_sites(m, kinds=["quantized"])
    assert [(s.tensor, s.kind) for s in sites] == [("s", "quantized")]  # the Reshape only moves values
    lo, hi = q_scale * (-128 - q_zp), q_scale * (127 - q_zp)
    assert sites[0].known_range == pytest.approx((lo, hi))
    # bounds: the quantizer's range, or the calibrated one where wider
    assert site_bounds(sites, {"s": (-1.0, 1.0)})["s"] == pytest.approx((lo * 1.02, hi * 1.02))
    assert site_bounds(sites, {"s": (-1.0, 9.0)})["s"] == pytest.approx((lo * 1.02, 9.0 * 1.02))
    r = restrict_ranges(m, site_bounds(sites, {"s": (-1.0, 1.0)}), "zero", sites)
    onnx.checker.check_model(r.model, full_check=True)
    x = np.float32([[0.1, -3.0, 2.0, 6.0], [-6.0, 0.0, 1e30, np.nan]])
    run = lambda model: make_session(model, "cpu").run(None, {"x": x})  # noqa: E731
    want, got = run(m), run(r.model)
    np.testing.assert_array_equal(got[0][0], want[0][0])  # in range: untouched
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][1, 2] == 0.0 and want[0][1, 2] == pytest.approx(q_scale * (127 - q_zp))  # zeroed, not saturated
    assert got[0][1, 3] == 0.0  # NaN never passes


def test_sample_vit_int8_quantized_zero_mode_stays_exact():
    m = onnx.load(samples.sample_model("vit_int8")["path"])
    data = load_npz(samples.sample_data_path(), input_specs(m))
    sites = find_range_sites(m, kinds=["softmax", "layernorm", "quantized"])
    kinds = [s.kind for s in sites]
    assert kinds.count("softmax") == 6 and kinds.count("layernorm") == 13 and kinds.count("quantized") > 40
    stats = calibrate_ranges(m, dataset_batches(data.head(256), 64), sites.needing_calibration())
    # alpha 0.25: test images exceed ranges calibrated on 256 images by up to 5.5% (at 0.02 this fails)
    r = restrict_ranges(m, site_bounds(sites, stats, alpha=0.25), "zero", sites)
    onnx.checker.check_model(r.model, full_check=True)
    test = data.batch(1000, 1064)
    run_at = lambda model: make_session(model, "cpu", level="basic").run(None, test)[0]  # noqa: E731
    np.testing.assert_array_equal(run_at(r.model), run_at(m))


def test_hardening_keeps_the_fault_sites_of_the_models_own_computation():
    """An elementwise op of a QDQ model whose result is quantized is faulted in its 8-bit result;
    a range check (or DMR) inserted between the op and its QuantizeLinear must not turn it into a
    float site: the site table of the model's own computation is the same before and after."""
    from onnxft.passes.dmr import duplicate

    m = onnx.load(samples.sample_model("vit_int8")["path"])
    sites = find_range_sites(m, kinds=["quantized"])
    restricted = restrict_ranges(m, site_bounds(sites, {s.tensor: s.known_range for s in sites}), "zero", sites).model
    hardened = duplicate(restricted).model

    def own(model):
        table = SiteTable.from_model(inject(model).model)
        # (float tensors a check renames get "/unrestricted"; quantized results keep their names)
        return sorted((s.node, s.format, s.output if s.format == "int8" else "")
                      for s in table.sites if not s.node.startswith("onnxft.dmr"))

    before = own(m)
    assert sum(1 for _, fmt, _ in before if fmt == "int8") > 80
    assert own(restricted) == before and own(hardened) == before
    copies = [s for s in SiteTable.from_model(inject(hardened).model).sites if s.node.startswith("onnxft.dmr")]
    assert copies and all(s.format == "fp32" for s in copies)  # the copy is quantized nowhere
    # and the injection graph runs: site ids follow the order the shape vectors are emitted in
    # (a quantized result is wrapped past the DMR tail, after the copy's sites)
    from onnxft.campaigns.evaluate import evaluate
    from onnxft.campaigns.spec import CampaignSpec

    data = load_npz(samples.sample_data_path(), input_specs(m)).head(8)
    r = evaluate(hardened, data, CampaignSpec(bers=(0.0, 1e-4), trials=1, provider="cpu", batch=8))
    assert r.points[0].value == r.clean and 0.0 <= r.points[1].value <= 1.0
