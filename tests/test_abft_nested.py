"""ABFT inside If branches and Loop bodies (passes.abft_nested): every inner MatMul protected, the
fault-free outputs those of the original, the full checker and stock onnxruntime happy, and a real
injected fault at each inner GEMM (in every Loop iteration) recovered."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.faults.sampling import Faults
from onnxft.graph.edit import walk
from onnxft.passes.abft_nested import abft_nested, captured
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession
from models import run_on_stock_onnxruntime

RNG = np.random.default_rng(11)
W1 = RNG.standard_normal((8, 12)).astype(np.float32)
W2 = RNG.standard_normal((8, 12)).astype(np.float32)
W3 = (RNG.standard_normal((12, 12)) * 0.3).astype(np.float32)
B1 = RNG.standard_normal(12).astype(np.float32)
STEPS = 3


def vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def control_flow_model():
    """x [n, 8] -> If(c): then MatMul(x, W1) + B1, Relu; else MatMul(x, W2) -> h0 [n, 12];
    Loop of 3 steps carrying h: h = Tanh(MatMul(h, W3)) -> y."""
    then = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["t0"], name="then_mm"),
                         h.make_node("Add", ["t0", "B1"], ["t1"], name="then_add"),
                         h.make_node("Relu", ["t1"], ["t2"], name="then_relu")],
                        "then", [], [vi("t2", T.FLOAT, ["n", 12])])
    other = h.make_graph([h.make_node("MatMul", ["x", "W2"], ["e0"], name="else_mm")],
                         "else", [], [vi("e0", T.FLOAT, ["n", 12])])
    body = h.make_graph([h.make_node("MatMul", ["h_in", "W3"], ["l0"], name="loop_mm"),
                         h.make_node("Tanh", ["l0"], ["h_out"], name="loop_tanh"),
                         h.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
                        "body", [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("h_in", T.FLOAT, ["n", 12])],
                        [vi("cond_out", T.BOOL, []), vi("h_out", T.FLOAT, ["n", 12])])
    nodes = [h.make_node("If", ["c"], ["h0"], name="If_0", then_branch=then, else_branch=other),
             h.make_node("Loop", ["steps", "", "h0"], ["y"], name="Loop_0", body=body)]
    g = h.make_graph(nodes, "g", [vi("x", T.FLOAT, ["n", 8]), vi("c", T.BOOL, [])], [vi("y", T.FLOAT, ["n", 12])],
                     [nh.from_array(W1, "W1"), nh.from_array(W2, "W2"), nh.from_array(W3, "W3"),
                      nh.from_array(B1, "B1"), nh.from_array(np.array(STEPS, np.int64), "steps")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def run(model, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def feeds(c: bool, n: int = 3):
    return {"x": RNG.standard_normal((n, 8)).astype(np.float32), "c": np.array(c)}


def test_captured_names_are_the_outer_scope_reads():
    m = control_flow_model()
    then = next(a.g for a in m.graph.node[0].attribute if a.name == "then_branch")
    assert captured(then) == ["x", "W1", "B1"]
    assert captured(m.graph.node[1].attribute[0].g) == ["W3"]


@pytest.mark.parametrize("scheme", ["lb", "standard"])
def test_inner_gemms_protected_fault_free_equal_and_portable(scheme, tmp_path):
    model = control_flow_model()
    r = abft_nested(model, scheme=scheme, block_size=4)
    got = {(g["graph"], g["name"]) for g in r.details["gemms"]}
    assert got == {("If_0.then_branch", "then_mm"), ("If_0.else_branch", "else_mm"), ("Loop_0.body", "loop_mm")}
    assert not [s for s in r.skipped if "subgraph" in s[1]]
    assert r.model.graph.node[0].output[:] == model.graph.node[0].output[:]  # the If's interface is unchanged
    onnx.checker.check_model(r.model, full_check=True)
    made = [o for _, n in walk(r.model.graph) for o in n.output if o.startswith("onnxft.abft.")]
    assert len(made) == len(set(made))  # no name repeats across scopes
    for c in (True, False):
        f = feeds(c)
        np.testing.assert_allclose(run(r.model, f), run(model, f), rtol=1e-6, atol=1e-6)
    f = feeds(True)
    np.testing.assert_allclose(run_on_stock_onnxruntime(r.model, f, tmp_path), run(model, f), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["lb", "standard"])
def test_injected_faults_in_branches_and_every_loop_step_recovered(scheme):
    model = control_flow_model()
    hardened = abft_nested(model, scheme=scheme, block_size=4).model
    sess = InjectionSession(inject(hardened).model, "cpu", threads=1)
    plain = InjectionSession(inject(model).model, "cpu", threads=1)
    for c in (True, False):
        f = feeds(c)
        clean, plans = sess.clean(f)
        np.testing.assert_allclose(clean[0], run(model, f), rtol=1e-6, atol=1e-6)
        sites = [i for i, s in enumerate(sess.table.sites) if s.kind == "gemm" and len(plans[i].executions)]
        assert len(sites) == 2  # the branch taken and the loop body
        for i in sites:
            for execution in range(len(plans[i].executions)):
                fault = Faults(np.array([i]), np.array([1]), np.array([5]), np.array([2 * plans[i].k - 2]),
                               np.array([30]), np.array([execution]))
                np.testing.assert_allclose(sess.run(f, fault)[0], clean[0], rtol=1e-5, atol=1e-5)
        c0, p0 = plain.clean(f)
        j = next(k for k, s in enumerate(plain.table.sites) if s.node.endswith("loop_mm"))
        fault = Faults(np.array([j]), np.array([1]), np.array([5]), np.array([2 * p0[j].k - 2]), np.array([30]),
                       np.array([1]))
        assert np.abs(plain.run(f, fault)[0] - c0[0]).max() > 1e-3
