"""DMR pass (duplicate-and-compare): exact when fault-free, corrects a corrupted output, copies are sites."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.graph.roles import PROTECTION, role_of
from onnxft.passes.dmr import DmrError, duplicate, op_types_from
from onnxft.passes.inject import SiteSelection, inject
from onnxft.faults.sites import SiteTable


def ln_model(opset=17, extra_output=False):
    rng = np.random.default_rng(0)
    outs = ["y", "mean"] if extra_output else ["y"]
    nodes = [h.make_node("LayerNormalization", ["x", "g", "b"], outs, name="ln", axis=-1, epsilon=1e-5),
             h.make_node("MatMul", ["y", "w"], ["out"], name="mm")]
    outputs = [h.make_tensor_value_info("out", T.FLOAT, ["n", 5, 3])]
    if extra_output:
        outputs.append(h.make_tensor_value_info("mean", T.FLOAT, None))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 5, 8])], outputs,
                     [nh.from_array(rng.standard_normal(8).astype(np.float32), "g"),
                      nh.from_array(rng.standard_normal(8).astype(np.float32), "b"),
                      nh.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def test_fault_free_identical_and_corruption_recomputed():
    m = ln_model()
    r = duplicate(m)
    onnx.checker.check_model(r.model, full_check=True)
    assert r.details["nodes"] == ["ln"] and r.details["tensors"] == ["y"]
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    want = run(m, {"x": x})[0]
    np.testing.assert_array_equal(run(r.model, {"x": x})[0], want)
    # corrupt the original's output (stand-in for a fault inside the LayerNorm): the copies disagree,
    # the If recomputes, and the output is the fault-free one; unprotected, the same corruption shows
    bad, bad_plain = perturbed(r.model, "ln", "onnxft.dmr.n000/unchecked"), perturbed(m, "ln", "y")
    for value in (np.nan, np.inf, 1e-6, 3.0):
        delta = np.zeros((3, 5, 8), np.float32)
        delta[1, 2, 3] = value
        np.testing.assert_array_equal(run(bad, {"x": x, "delta": delta})[0], want)
        assert not np.array_equal(run(bad_plain, {"x": x, "delta": delta})[0], want)


def perturbed(model, node_name, tensor):
    """``model`` with ``delta`` (a graph input) added to ``tensor`` right after its producer."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    node = next(n for n in bad.graph.node if n.name == node_name)
    node.output[0] = tensor + "/clean"
    bad.graph.node.insert(list(bad.graph.node).index(node) + 1,
                          h.make_node("Add", [tensor + "/clean", "delta"], [tensor], name="test/perturb"))
    bad.graph.input.append(h.make_tensor_value_info("delta", T.FLOAT, None))
    return bad


def test_copy_is_a_fault_site_checks_are_not():
    r = duplicate(ln_model())
    roles = {n.name: role_of(n) for n in r.model.graph.node}
    assert roles["onnxft.dmr.n000/copy"] is None  # the model's own computation, done twice
    assert all(v == PROTECTION for k, v in roles.items() if k.startswith("onnxft.dmr.n000/") and k != "onnxft.dmr.n000/copy")
    sites = SiteTable.from_model(inject(r.model).model).sites
    assert any(s.node.startswith("onnxft.dmr.n000/copy/") for s in sites)  # decomposed like the original
    assert not any(s.node.startswith("onnxft.dmr.n000/") and "/copy/" not in s.node for s in sites)
    with_checks = SiteTable.from_model(inject(r.model, SiteSelection(include_protection=True)).model).sites
    assert len(with_checks) > len(sites)


def test_skips_and_errors():
    r = duplicate(ln_model(extra_output=True))
    assert r.details["nodes"] == [] and "more than one output" in r.skipped[0][1]
    assert duplicate(ln_model(), ["Softmax"]).skipped  # nothing to duplicate: said so
    with pytest.raises(DmrError):
        duplicate(ln_model(), [])
    with pytest.raises(DmrError):
        duplicate(ln_model(), names="(")
    assert op_types_from(["layernorm", " Softmax", ""]) == ("LayerNormalization", "Softmax")
