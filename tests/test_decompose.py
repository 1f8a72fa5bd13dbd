"""Tests for onnxft.passes.decompose: numerics vs onnxruntime, structure, purity."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxft.passes.decompose import HANDLERS, ORIGIN_KEY, ORIGIN_NODE_KEY, decompose

RNG = np.random.default_rng(0)
NP = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16, TP.DOUBLE: np.float64}
TOL = {TP.FLOAT: dict(rtol=1e-5, atol=1e-6), TP.DOUBLE: dict(rtol=1e-12, atol=1e-12),
       TP.FLOAT16: dict(rtol=1e-2, atol=2e-3)}


def make_model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def vi(name, shape, et=TP.FLOAT):
    return helper.make_tensor_value_info(name, et, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def rand(shape, et=TP.FLOAT, scale=2.0):
    return (RNG.standard_normal(shape) * scale).astype(NP[et])


def run(model, feeds):
    so = ort.SessionOptions()
    # No graph optimizations: ORT must execute our primitive nodes, not re-fuse them.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model, feeds, fused, et=TP.FLOAT, op_types=None, expect_nodes=None):
    before = model.SerializeToString()
    res = decompose(model, op_types)
    assert model.SerializeToString() == before, "input model was mutated"
    assert res.model is not model
    out = res.model
    assert fused not in {n.op_type for n in out.graph.node}
    onnx.checker.check_model(out, full_check=True)
    assert res.skipped == []
    assert len(res.inserted) == sum(n.op_type == fused for n in model.graph.node)
    # Graph outputs keep their names; every new node carries its origin.
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    orig_names = {n.name for n in model.graph.node}
    new = [n for n in out.graph.node if n.name not in orig_names]
    assert new
    for n in new:
        meta = {p.key: p.value for p in n.metadata_props}
        assert meta[ORIGIN_KEY] == fused
        assert meta[ORIGIN_NODE_KEY]
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))
    if expect_nodes is not None:
        assert f"-> {expect_nodes} nodes" in res.inserted[0]
    for e, g in zip(run(model, feeds), run(out, feeds)):
        assert e.dtype == g.dtype and e.shape == g.shape
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), **TOL[et])
    return res


# ----------------------------------------------------------------------------- Softmax

@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, axis):
    node = helper.make_node(op, ["x"], ["y"], name=f"/blk/{op}", axis=axis)
    m = make_model([node], [vi("x", [2, 5, 7])], [vi("y", [2, 5, 7])])
    res = check(m, {"x": rand([2, 5, 7], scale=5.0)}, op, expect_nodes=5 if op == "Softmax" else 6)
    assert res.inserted[0] == f"{op} /blk/{op} -> {5 if op == 'Softmax' else 6} nodes"
    types = [n.op_type for n in res.model.graph.node]
    assert types[:4] == ["ReduceMax", "Sub", "Exp", "ReduceSum"]
    assert res.model.graph.node[0].name == f"/blk/{op}/ReduceMax"
    assert res.model.graph.node[-1].output[0] == "y"


def test_softmax_float16():
    node = helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=-1)
    m = make_model([node], [vi("x", [4, 9], TP.FLOAT16)], [vi("y", [4, 9], TP.FLOAT16)])
    check(m, {"x": rand([4, 9], TP.FLOAT16)}, "Softmax", et=TP.FLOAT16)


# ----------------------------------------------------------------------------- LayerNorm

def _ln_model(shape, axis, scale=True, bias=True, et=TP.FLOAT, unknown_rank=False, **attrs):
    """LayerNorm model. ``unknown_rank``: feed LN through a Reshape whose target shape is a
    graph input of unknown length, so shape inference cannot know the rank of LN's input."""
    norm_shape = shape[axis:]
    x = "xr" if unknown_rank else "x"
    inputs = [x, "scale" if scale else "", "bias" if bias else ""]
    while inputs and not inputs[-1]:
        inputs.pop()
    inits = []
    if scale:
        inits.append(init("scale", rand(norm_shape, et, 1.0)))
    if bias:
        inits.append(init("bias", rand(norm_shape, et, 1.0)))
    nodes = [helper.make_node("LayerNormalization", inputs, ["y"], name="/blocks.0/norm1/LayerNormalization",
                              axis=axis, **attrs)]
    graph_inputs = [vi("x", shape, et)]
    if unknown_rank:
        nodes.insert(0, helper.make_node("Reshape", ["x", "shp"], ["xr"], name="reshape"))
        graph_inputs.append(vi("shp", ["n"], TP.INT64))
    return make_model(nodes, graph_inputs, [vi("y", shape, et)], inits)


def test_layernorm_last_axis():
    m = _ln_model([2, 6, 16], -1, epsilon=1e-3)
    res = check(m, {"x": rand([2, 6, 16]) + 3.0}, "LayerNormalization", expect_nodes=9)
    assert res.inserted == ["LayerNormalization /blocks.0/norm1/LayerNormalization -> 9 nodes"]
    types = [n.op_type for n in res.model.graph.node]
    assert types == ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]
    assert "Pow" not in types


def test_layernorm_negative_axis_scale_only():
    m = _ln_model([3, 4, 5, 6], -2, bias=False)
    check(m, {"x": rand([3, 4, 5, 6])}, "LayerNormalization", expect_nodes=8)


def test_layernorm_positive_axis_known_rank():
    m = _ln_model([3, 4, 5], 1)
    res = check(m, {"x": rand([3, 4, 5])}, "LayerNormalization")
    axes = [t for t in res.model.graph.initializer if t.name.endswith("/axes")]
    assert numpy_helper.to_array(axes[0]).tolist() == [1, 2]


def test_layernorm_float16_stash_float32():
    m = _ln_model([2, 8, 32], -1, et=TP.FLOAT16, stash_type=1)
    res = check(m, {"x": rand([2, 8, 32], TP.FLOAT16)}, "LayerNormalization", et=TP.FLOAT16, expect_nodes=11)
    assert [n.op_type for n in res.model.graph.node].count("Cast") == 2
    eps = [t for t in res.model.graph.initializer if t.name.endswith("/eps")][0]
    assert eps.data_type == TP.FLOAT  # epsilon lives in the stash type


def test_layernorm_double():
    m = _ln_model([2, 8], -1, et=TP.DOUBLE, stash_type=TP.DOUBLE)
    res = check(m, {"x": rand([2, 8], TP.DOUBLE)}, "LayerNormalization", et=TP.DOUBLE, expect_nodes=9)
    assert all(t.data_type == TP.DOUBLE for t in res.model.graph.initializer if t.name.startswith("y/") and t.name != "y/axes")


def test_layernorm_unknown_rank_skipped():
    m = _ln_model([2, 6, 16], 2, unknown_rank=True)
    before = m.SerializeToString()
    res = decompose(m)
    assert m.SerializeToString() == before
    assert res.inserted == []
    assert len(res.skipped) == 1
    name, reason = res.skipped[0]
    assert name == "/blocks.0/norm1/LayerNormalization"
    assert "rank" in reason and "unknown" in reason
    assert [n.op_type for n in res.model.graph.node] == ["Reshape", "LayerNormalization"]
    assert res.model is not m


def test_layernorm_unknown_rank_negative_axis_ok():
    # A negative axis needs no rank: axes [-2, -1] work for any rank.
    m = _ln_model([2, 6, 16], -2, unknown_rank=True)
    check(m, {"x": rand([2, 6, 16]), "shp": np.array([2, 6, 16], np.int64)}, "LayerNormalization")


def test_layernorm_used_mean_output_skipped():
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], name="ln", axis=-1)
    idn = helper.make_node("Identity", ["mean"], ["mean_out"], name="id")
    m = make_model([node, idn], [vi("x", [2, 4])], [vi("y", [2, 4]), vi("mean_out", None)],
                   [init("scale", np.ones(4, np.float32))])
    res = decompose(m)
    assert res.inserted == [] and res.skipped[0][0] == "ln" and "mean" in res.skipped[0][1]


def test_layernorm_unused_mean_output_dropped():
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean", "inv_std"], name="ln", axis=-1)
    m = make_model([node], [vi("x", [2, 4])], [vi("y", [2, 4])], [init("scale", rand([4]))])
    check(m, {"x": rand([2, 4])}, "LayerNormalization")


# ----------------------------------------------------------------------------- Gelu

@pytest.mark.parametrize("approx,n", [("none", 5), ("tanh", 9)])
def test_gelu(approx, n):
    node = helper.make_node("Gelu", ["x"], ["y"], name="/mlp/Gelu", approximate=approx)
    m = make_model([node], [vi("x", [3, 50])], [vi("y", [3, 50])], opset=20)
    res = check(m, {"x": rand([3, 50], scale=3.0)}, "Gelu", expect_nodes=n)
    assert ("Erf" if approx == "none" else "Tanh") in {x.op_type for x in res.model.graph.node}


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_gelu_float16(approx):
    node = helper.make_node("Gelu", ["x"], ["y"], name="g", approximate=approx)
    m = make_model([node], [vi("x", [4, 40], TP.FLOAT16)], [vi("y", [4, 40], TP.FLOAT16)], opset=20)
    res = check(m, {"x": rand([4, 40], TP.FLOAT16)}, "Gelu", et=TP.FLOAT16)
    assert all(t.data_type == TP.FLOAT16 for t in res.model.graph.initializer)


# ----------------------------------------------------------------------------- BatchNorm

def test_batchnorm_nchw():
    c = 3
    inits = [init("s", rand([c], scale=1.0)), init("b", rand([c])), init("mu", rand([c])),
             init("var", RNG.uniform(0.5, 2.0, c).astype(np.float32))]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["y"], name="/bn", epsilon=1e-3)
    m = make_model([node], [vi("x", [2, c, 5, 4])], [vi("y", [2, c, 5, 4])], inits)
    res = check(m, {"x": rand([2, c, 5, 4])}, "BatchNormalization", expect_nodes=2)
    assert [n.op_type for n in res.model.graph.node] == ["Mul", "Add"]
    shapes = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert shapes == {"y/a": [c, 1, 1], "y/c": [c, 1, 1]}  # old stats dropped, only a/c remain


def test_batchnorm_nonconstant_skipped():
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["y"], name="/bn")
    m = make_model([node], [vi("x", [2, 3, 4]), vi("s", [3]), vi("b", [3]), vi("mu", [3]), vi("var", [3])],
                   [vi("y", [2, 3, 4])])
    res = decompose(m)
    assert res.inserted == [] and res.skipped[0][0] == "/bn" and "constant" in res.skipped[0][1]


# ----------------------------------------------------------------------------- Sigmoid family

@pytest.mark.parametrize("op,attrs,n", [("Sigmoid", {}, 4), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 3),
                                        ("HardSigmoid", {}, 3), ("HardSwish", {}, 4)])
def test_sigmoid_family(op, attrs, n):
    node = helper.make_node(op, ["x"], ["y"], name=f"/act/{op}", **attrs)
    m = make_model([node], [vi("x", [4, 33])], [vi("y", [4, 33])])
    check(m, {"x": rand([4, 33], scale=6.0)}, op, expect_nodes=n)


def test_sigmoid_float16():
    node = helper.make_node("Sigmoid", ["x"], ["y"], name="s")
    m = make_model([node], [vi("x", [64], TP.FLOAT16)], [vi("y", [64], TP.FLOAT16)])
    check(m, {"x": rand([64], TP.FLOAT16, 4.0)}, "Sigmoid", et=TP.FLOAT16)


# ----------------------------------------------------------------------------- Gemm

def test_gemm_transb_constant_b_and_c():
    w = rand([6, 4])  # [N, K], transB=1
    cvec = rand([6])
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="/fc/Gemm", transB=1, alpha=0.5, beta=2.0)
    m = make_model([node], [vi("x", [3, 4])], [vi("y", [3, 6])], [init("W", w), init("C", cvec)])
    res = check(m, {"x": rand([3, 4])}, "Gemm", expect_nodes=3)
    types = [n.op_type for n in res.model.graph.node]
    assert types == ["MatMul", "Mul", "Add"]  # transpose and beta*C done offline
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert "W" not in inits and "C" not in inits
    np.testing.assert_array_equal(inits["y/B_T"], w.T)
    np.testing.assert_allclose(inits["y/beta_C"], 2.0 * cvec)


def test_gemm_nonconstant_a_transa():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="/fc2/Gemm", transA=1, beta=0.25)
    m = make_model([node], [vi("a", [5, 3]), vi("b", [5, 7]), vi("c", [1, 7])], [vi("y", [3, 7])])
    res = check(m, {"a": rand([5, 3]), "b": rand([5, 7]), "c": rand([1, 7])}, "Gemm", expect_nodes=4)
    assert [n.op_type for n in res.model.graph.node] == ["Transpose", "MatMul", "Mul", "Add"]


def test_gemm_plain_is_single_matmul():
    node = helper.make_node("Gemm", ["a", "b"], ["y"])  # unnamed
    m = make_model([node], [vi("a", [2, 3]), vi("b", [3, 4])], [vi("y", [2, 4])])
    res = check(m, {"a": rand([2, 3]), "b": rand([3, 4])}, "Gemm", expect_nodes=1)
    (mm,) = res.model.graph.node
    assert mm.op_type == "MatMul" and mm.output[0] == "y" and mm.name == "Gemm(y)/MatMul"
    assert res.inserted == ["Gemm Gemm(y) -> 1 nodes"]


def test_gemm_constant_c_shared_is_kept():
    # C also read elsewhere: it must stay as an initializer.
    node = helper.make_node("Gemm", ["a", "b", "C"], ["y"], name="g", beta=3.0)
    add = helper.make_node("Add", ["y", "C"], ["z"], name="add")
    m = make_model([node, add], [vi("a", [2, 3]), vi("b", [3, 4])], [vi("z", [2, 4])], [init("C", rand([4]))])
    res = check(m, {"a": rand([2, 3]), "b": rand([3, 4])}, "Gemm")
    assert "C" in {t.name for t in res.model.graph.initializer}


# ----------------------------------------------------------------------------- whole-pass behaviour

def _chain_model():
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["h"], ["s"], name="act"),
        helper.make_node("LayerNormalization", ["s", "g"], ["n"], name="ln", axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], name="sm"),
    ]
    return make_model(nodes, [vi("x", [4, 8])], [vi("y", [4, 6])], [init("W", rand([6, 8])), init("g", rand([6]))])


def test_chain_all_ops_topologically_sorted():
    m = _chain_model()
    res = decompose(m)
    onnx.checker.check_model(res.model, full_check=True)  # checks topological order too
    assert len(res.inserted) == 4
    origins = [dict((p.key, p.value) for p in n.metadata_props)[ORIGIN_NODE_KEY] for n in res.model.graph.node]
    # replacements appear in the original node order, contiguously
    assert [o for i, o in enumerate(origins) if i == 0 or origins[i - 1] != o] == ["fc", "act", "ln", "sm"]
    x = rand([4, 8])
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_op_types_filter():
    res = decompose(_chain_model(), ["Softmax", "Sigmoid"])
    types = {n.op_type for n in res.model.graph.node}
    assert {"Gemm", "LayerNormalization"} <= types and not {"Softmax", "Sigmoid"} & types
    assert len(res.inserted) == 2


def test_unknown_op_type_and_low_opset_rejected():
    with pytest.raises(ValueError, match="no decomposition"):
        decompose(_chain_model(), ["Conv"])
    m = _chain_model()
    m.opset_import[0].version = 17
    with pytest.raises(ValueError, match="opset"):
        decompose(m)


def test_subgraph_nodes_rewritten():
    then_g = helper.make_graph([helper.make_node("Softmax", ["x"], ["t"], name="inner_sm")], "then", [],
                               [vi("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                               [vi("e", [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("cond", [], TP.BOOL), vi("x", [2, 3])], [vi("y", [2, 3])])
    res = decompose(m)
    assert len(res.inserted) == 1 and res.inserted[0].startswith("Softmax inner_sm")
    then_ops = [n.op_type for n in next(a.g for a in res.model.graph.node[0].attribute if a.name == "then_branch").node]
    assert "Softmax" not in then_ops and "Exp" in then_ops
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        np.testing.assert_allclose(run(res.model, feeds)[0], run(m, feeds)[0], rtol=1e-6, atol=1e-7)


def test_registry_covers_brief():
    assert set(HANDLERS) == {"Softmax", "LogSoftmax", "LayerNormalization", "Gelu", "BatchNormalization",
                             "Sigmoid", "HardSigmoid", "HardSwish", "Gemm", "LSTM", "GRU", "RNN", "Einsum"}
