"""Hardened files hold no copy of a weight (issue 11, item 4: "at most 1.05x the original plus
checksum vectors"). LB-ABFT's recovery branch sums a constant weight's column blocks at run time
from the weight read by name (no ``[K, N/b]`` constants); a depthwise Conv's channel "sums" (its own
scaled filter) are main-graph nodes on the weight that onnxruntime folds at load."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import samples
from onnxft.passes.abft import abft
from onnxft.passes.thresholds import tau_bound
from models import perturbed, run_on_stock_onnxruntime

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def constants(graph: onnx.GraphProto, depth: int = 0):
    """``(depth, name, array)`` of every initializer and Constant node, in subgraphs too."""
    for t in graph.initializer:
        yield depth, t.name, nh.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant":
            yield depth, n.output[0], nh.to_array(n.attribute[0].t)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from constants(sub, depth + 1)


def session(model, level="basic", optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, feeds, level="basic"):
    s = session(model, level)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def flags(outs):
    det = [v for k, v in outs.items() if k.endswith(".detected")]
    rec = [v for k, v in outs.items() if k.endswith(".recomputed")]
    return bool(det[0]), int(rec[0])


def make(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def vi(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, shape)


# --- LB-ABFT: no block-checksum matrices ------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "vit_int8"])
def test_sample_vit_lb_stores_no_block_checksum_matrices(name):
    """The hardened sample ViTs (float32 and QDQ int8) hold no ``[K, ceil(N/b)]`` tensor (nb > 1) for
    any constant-weight GEMM (they were two per GEMM, 2/b of the weight); the float32 one's added
    constants are under 5% of its own (checksum vectors, thresholds, indices)."""
    model = onnx.load(samples.sample_model(name)["path"])
    r = abft(model, scheme="lb")
    shapes = {(g["K"], -(-g["N"] // g["block_size"])) for g in r.details["gemms"]
              if g["b_constant"] and -(-g["N"] // g["block_size"]) > 1}
    assert shapes  # (the sample has constant-weight GEMMs with several column blocks)
    found = [(d, name, v.shape) for d, name, v in constants(r.model.graph) if tuple(v.shape) in shapes]
    assert not found, found[:4]
    before = sum(v.nbytes for _, _, v in constants(model.graph))
    added = sum(v.nbytes for _, _, v in constants(r.model.graph)) - before
    assert name == "vit_int8" or added <= 0.05 * before, (added, before)  # (int8: float32 vectors, int8 weights)


def _gemm_model(kind: str, n: int, k: int = 16):
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((k, n)) * 0.5).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if kind == "matmul_bias":
        nodes = [h.make_node("MatMul", ["a", "w"], ["y"], name="mm"), h.make_node("Add", ["y", "bias"], ["out"])]
        inits = [nh.from_array(w, "w"), nh.from_array(bias, "bias")]
        return make(nodes, [vi("a", ["n", 7, k])], [vi("out", ["n", 7, n])], inits)
    if kind == "qdq":  # an int8 weight dequantised in the graph: the branch reads the DequantizeLinear output
        scale = np.float32(np.abs(w).max() / 127)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        nodes = [h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
                 h.make_node("MatMul", ["a", "w"], ["y"], name="mm"), h.make_node("Add", ["y", "bias"], ["out"])]
        inits = [nh.from_array(q, "wq"), nh.from_array(np.array(scale), "ws"),
                 nh.from_array(np.array(0, np.int8), "wz"), nh.from_array(bias, "bias")]
        return make(nodes, [vi("a", ["n", 7, k])], [vi("out", ["n", 7, n])], inits)
    # Gemm with transB and alpha: the branch reads the weight as Mul(Transpose(W), alpha), one more rounding
    nodes = [h.make_node("Gemm", ["a", "w", "bias"], ["out"], name="mm", transB=1, alpha=0.5, beta=1.0)]
    inits = [nh.from_array(np.ascontiguousarray(w.T), "w"), nh.from_array(bias, "bias")]
    return make(nodes, [vi("a", ["m", k])], [vi("out", ["m", n])], inits)


@pytest.mark.parametrize("kind,n,b,impl", [("matmul_bias", 12, 4, "global"), ("matmul_bias", 10, 4, "global"),
                                          ("gemm", 10, 3, "global"), ("matmul_bias", 10, 4, "fused"),
                                          ("qdq", 10, 4, "global")])
def test_lb_constant_weight_recovers_with_runtime_block_checksums(kind, n, b, impl):
    """A constant-weight GEMM under LB, N a multiple of b and not: the branch's block tau is the
    bound for run-time block sums (one more term for Gemm's alpha), no weight-derived matrix is
    stored (fused: the widened weight replaces the model's, and the recovery reads its first N
    columns and the widened bias's first N entries), no copy of the bias either, fault-free outputs
    are bit-identical with no alarm, and corrupted outputs (one block, two blocks including the
    partial edge one, a NaN) are detected and recomputed exactly."""
    model = _gemm_model(kind, n)
    r = abft(model, scheme="lb", block_size=b, expose_flags=True, precision="fp32", impl=impl)
    assert r.details["gemms"][0]["impl"] == impl
    onnx.checker.check_model(r.model, full_check=True)
    (plan,) = r.details["gemms"]
    assert plan["scheme"] == "lb" and plan["block_size"] == b and plan["b_constant"]
    k = plan["K"]
    extra = 2 + (kind == "gemm")  # bias (and beta), alpha
    want_tau = np.float32(min(tau_bound(k, b + (kind == "gemm"), "fp32", extra, runtime_checksums=True),
                              plan["tau"]))
    then = next(n for n in r.model.graph.node if n.op_type == "If").attribute
    then_g = next(a.g for a in then if a.name == "then_branch")
    scalars = [v for _, _, v in constants(then_g) if v.dtype == np.float32 and v.size == 1]
    assert any(v.reshape(()) == want_tau for v in scalars), (want_tau, scalars)
    own = {name for _, name, _ in constants(model.graph)}
    added = [(name, v) for _, name, v in constants(r.model.graph) if name not in own]
    assert not [v.shape for name, v in added if "Bwide" not in name and v.ndim == 2 and min(v.shape) > 1
                and v.size >= k], "a weight-derived matrix is stored"
    assert not [name for name, v in added if v.size == n], "a copy of the bias is stored"
    rng = np.random.default_rng(1)
    shape = (5, k) if kind == "gemm" else (3, 7, k)
    s_clean = session(model)
    for scale in (1e-3, 1.0, 1e3):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        got = run(r.model, {"a": a})
        np.testing.assert_array_equal(got["out"], s_clean.run(None, {"a": a})[0])
        assert flags(got) == (False, 0)
    m = perturbed(r.model)
    a = rng.standard_normal(shape).astype(np.float32)
    want = s_clean.run(None, {"a": a})[0]
    last = (n - 1) // b * b  # a column of the last (partial when b does not divide N) block
    hits = [[(1, 1)], [(0, 2), (4, last)], [(3, n - 1)]]
    for cells, value in zip(hits, (40.0, -7.0, np.nan)):
        delta = np.zeros(want.shape, np.float32)
        for row, col in cells:
            delta[(row, col) if kind == "gemm" else (1, row, col)] = value
        got = run(m, {"a": a, "delta": delta})
        assert flags(got) == (True, len(cells) * b * b), (cells, value)
        np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-5)


def test_calibrated_threshold_still_tightens_the_block_test():
    """A calibrated tau below the rounding bound is the block test's tau too (min of the two)."""
    model = _gemm_model("matmul_bias", 12)
    r = abft(model, scheme="lb", block_size=4, thresholds={"mm": 3e-6})
    then_g = next(a.g for n in r.model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert any(v.dtype == np.float32 and v.size == 1 and v.reshape(()) == np.float32(3e-6)
               for _, _, v in constants(then_g))


# --- depthwise convolutions: the channel "sums" are nodes on the weight ---------------------------


def _depthwise_model(weight_as: str, bn: bool):
    """Depthwise Conv (8 channels, 3x3, no bias), optionally followed by a BatchNormalization the
    unit absorbs; the weight an initializer or a Constant node (opset-12 Paddle exports)."""
    rng = np.random.default_rng(3)
    c = 8
    w = (rng.standard_normal((c, 1, 3, 3)) * 0.5).astype(np.float32)
    nodes, inits = [], []
    if weight_as == "constant":
        nodes.append(h.make_node("Constant", [], ["w"], value=nh.from_array(w, "w")))
    else:
        inits.append(nh.from_array(w, "w"))
    nodes.append(h.make_node("Conv", ["x", "w"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1]))
    out = "y"
    bn_params = None
    if bn:
        bn_params = [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c) * 0.1,
                     rng.uniform(0.5, 2, c)]
        inits += [nh.from_array(v.astype(np.float32), nm) for v, nm in zip(bn_params, ("g", "b", "m", "v"))]
        nodes.append(h.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn"))
        out = "z"
    nodes.append(h.make_node("Relu", [out], ["out"], name="relu"))
    model = make(nodes, [vi("x", ["n", c, 6, 6])], [vi("out", ["n", c, 6, 6])], inits, opset=13)
    return model, w, bn_params


@pytest.mark.parametrize("weight_as,bn", [("initializer", False), ("initializer", True), ("constant", True)])
def test_depthwise_conv_checksums_are_folded_nodes_not_copies(weight_as, bn, tmp_path):
    model, w, bn_params = _depthwise_model(weight_as, bn)
    r = abft(model, expose_flags=True, precision="fp32")
    onnx.checker.check_model(r.model, full_check=True)
    (plan,) = r.details["convs"]
    assert plan["group"] == 8 and plan["N"] == 1 and plan["absorbed"] == (["bn"] if bn else [])
    # no weight-sized tensor besides the weight itself, at any depth
    copies = [(d, name) for d, name, v in constants(r.model.graph) if v.size >= w.size and name != "w"]
    assert not copies, copies
    # the check's two filters, computed by the graph, are bit for bit numpy's float64 values rounded
    # once (what the pass stored before): Wsum = float32(W chan), AbsWsum = float32(tau |W chan|)
    chan = np.ones(8)
    if bn:
        gamma, _, _, var = (np.asarray(v, np.float32).astype(np.float64) for v in bn_params)
        chan = gamma / np.sqrt(var + 1e-5)
    w_chan = w.astype(np.float64) * chan.reshape(-1, 1, 1, 1)
    want_ws, want_abs = w_chan.astype(np.float32), (plan["tau"] * np.abs(w_chan)).astype(np.float32)
    checks = [n for n in r.model.graph.node if n.op_type == "Conv" and n.name != "dw"]
    assert len(checks) == 2
    probe = onnx.ModelProto()
    probe.CopyFrom(r.model)
    probe.graph.output.extend(vi(n.input[1], None) for n in checks)
    x = np.random.default_rng(4).standard_normal((2, 8, 6, 6)).astype(np.float32)
    for level in ("disable", "all"):
        got = run(probe, {"x": x}, level)
        for n, want in zip(checks, (want_ws, want_abs)):
            np.testing.assert_array_equal(got[n.input[1]].view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(got["out"], session(model, level).run(None, {"x": x})[0])
        assert flags(got) == (False, 0), level
    # onnxruntime folds the nodes at load and keeps the check's Conv apart from the model's
    opt = tmp_path / "opt.onnx"
    session(r.model, "basic", opt)
    folded = onnx.load(str(opt))
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 3
    assert not [n for n in folded.graph.node if n.op_type in ("Cast", "Mul") and n.input[0] == "w"]
    # a corrupted output is detected and its item recomputed
    m = perturbed(r.model, "c000")
    delta = np.zeros((2, 8, 6, 6), np.float32)
    delta[1, 5, 2, 3] = -30.0
    for level in ("disable", "all"):
        got = run(m, {"x": x, "delta": delta}, level)
        assert flags(got) == (True, 8 * 36), level
        np.testing.assert_allclose(got["out"], session(model, level).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    for level in ("disable", "all"):
        np.testing.assert_array_equal(run_on_stock_onnxruntime(r.model, {"x": x}, tmp_path, level),
                                      session(model, level).run(None, {"x": x})[0])
