"""Range restriction on a float16 graph (regression: hardening an fp16 transformer failed to load).

The model mirrors what onnxruntime.transformers.float16 writes: float32 input and output, Cast
nodes at the edges, and float16 computation in between (MatMul -> Softmax -> MatMul -> GELU in
its Erf form). The restriction must be written in float16 (float16 bounds, Clip in float16) and
every step that runs the model with intermediate tensors as extra outputs (calibration, the
equivalence check) must declare them float16, not float."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.campaigns.calibrate_ranges import calibrate_ranges
from onnxft.campaigns.harden import HardenOptions, harden
from onnxft.graph.edit import with_outputs
from onnxft.passes.ranges import find_range_sites, restrict_ranges, site_bounds
from onnxft.runtime.data import Dataset
from onnxft.runtime.session import make_session


def fp16_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def f16(name, value):
        return nh.from_array(np.asarray(value, np.float16), name)

    nodes = [
        h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16, name="in/Cast"),
        h.make_node("MatMul", ["x16", "wq"], ["scores"], name="attn/MatMul"),
        h.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="attn/Softmax"),
        h.make_node("MatMul", ["probs", "wv"], ["p"], name="fc/MatMul"),
        h.make_node("Div", ["p", "sqrt2"], ["p_s"], name="gelu/Div"),
        h.make_node("Erf", ["p_s"], ["e"], name="gelu/Erf"),
        h.make_node("Add", ["e", "one"], ["e1"], name="gelu/Add"),
        h.make_node("Mul", ["p", "e1"], ["pe"], name="gelu/Mul"),
        h.make_node("Mul", ["pe", "half"], ["g"], name="gelu/Mul_1"),
        h.make_node("Cast", ["g"], ["y"], to=T.FLOAT, name="out/Cast"),
    ]
    inits = [f16("wq", rng.standard_normal((8, 8))), f16("wv", rng.standard_normal((8, 8))),
             f16("sqrt2", math.sqrt(2.0)), f16("one", 1.0), f16("half", 0.5)]
    g = h.make_graph(nodes, "fp16", [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 4, 8])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def data(n: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 8)).astype(np.float32)


def test_with_outputs_keeps_float16_types():
    m = with_outputs(fp16_model(), ["probs", "g"])
    types = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert types == {"y": T.FLOAT, "probs": T.FLOAT16, "g": T.FLOAT16}
    probs, g = make_session(m, "cpu").run(["probs", "g"], {"x": data(2)})
    assert probs.dtype == np.float16 and g.dtype == np.float16


@pytest.mark.parametrize("mode", ["clamp", "zero"])
def test_float16_graph_restricted_in_float16(mode):
    m = fp16_model()
    x = data()
    sites = find_range_sites(m)
    assert [(s.tensor, s.kind) for s in sites] == [("probs", "softmax"), ("g", "gelu")]
    stats = calibrate_ranges(m, [{"x": x}], sites.needing_calibration())
    bounds = site_bounds(sites, stats)
    r = restrict_ranges(m, bounds, mode, sites)
    onnx.checker.check_model(r.model, full_check=True)
    inits = {t.name: t for t in r.model.graph.initializer}
    clips = [n for n in r.model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2
    for clip in clips:  # the bounds are float16 initializers, rounded outward around the float bounds
        lo, hi = (inits[i] for i in clip.input[1:])
        assert lo.data_type == hi.data_type == T.FLOAT16
        want_lo, want_hi = bounds[clip.input[0].split("/")[0]]
        assert float(nh.to_array(lo)) <= want_lo and float(nh.to_array(hi)) >= want_hi
    assert all(inits[n].data_type == T.FLOAT16 for n in inits if "/range_" in n)
    hardened = make_session(r.model, "cpu")  # loads (it did not: float declared for a float16 tensor)
    want = make_session(m, "cpu").run(None, {"x": x})[0]
    np.testing.assert_array_equal(hardened.run(None, {"x": x})[0], want)
    # the restriction acts: a GELU input pushed far past its calibrated range is bounded (clamp) or zeroed
    big = x.copy()
    big[0] *= 1000
    out = hardened.run(None, {"x": big})[0][0]
    hi = float(nh.to_array(inits[clips[1].input[2]]))
    assert np.isfinite(out).all() and out.max() <= hi


def test_harden_float16_model_range_only():
    """The whole harden step (calibration, restriction, equivalence check with the restricted
    tensors as extra outputs) on the float16 model: fault-free outputs on the held-out items equal."""
    m = fp16_model()
    res = harden(m, HardenOptions(abft="none", precision="fp32"), Dataset({"x": data(64)}, None))
    v = res.plan["verification"]
    assert v["items"] == 16 and v["in_range_items"] >= 1 and v["in_range_max_abs_diff"] == 0.0
    assert sorted(r["kind"] for r in res.plan["ranges"]) == ["gelu", "softmax"]
    inits = {t.name: t.data_type for t in res.model.graph.initializer}
    assert {inits[n.input[1]] for n in res.model.graph.node if n.op_type == "Clip"} == {T.FLOAT16}
