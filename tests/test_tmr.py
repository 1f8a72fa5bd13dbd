"""TMR pass: fault-free equality, majority voting against numpy, and outvoting one faulty copy."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

from models import tiny_transformer
from onnxft.campaigns.evaluate import trial_rng
from onnxft.faults.sampling import sample_faults
from onnxft.graph.roles import PROTECTION, role_of
from onnxft.passes.inject import SiteSelection, inject
from onnxft.passes.tmr import _voter, tmr
from onnxft.runtime.session import InjectionSession


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_voter_is_a_median_that_outvotes_one_bad_copy():
    nodes = _voter("a", "b", "c", "y")
    assert all(role_of(n) == PROTECTION for n in nodes)
    vi = [h.make_tensor_value_info(n, T.FLOAT, [6]) for n in "abc"]
    g = h.make_graph(nodes, "v", vi, [h.make_tensor_value_info("y", T.FLOAT, [6])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    good = np.array([1.5, -2.0, 0.0, 3.0, 7.0, 1e30], np.float32)
    a, b, c = good.copy(), good.copy(), good.copy()
    a[0], b[1], c[2], a[3], b[4] = np.nan, np.inf, -1.0, 9.0, -9.0  # one bad copy per element
    y = _run(m, {"a": a, "b": b, "c": c})[0]
    np.testing.assert_array_equal(y, good)


def test_tmr_is_exact_fault_free_and_outvotes_one_faulty_copy():
    model = tiny_transformer(seed=3)
    res = tmr(model, r"^/blocks\.0/")
    onnx.checker.check_model(res.model, full_check=True)
    assert res.details["voted"], "the block's output must be voted"
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], _run(res.model, {"x": x})[0])

    # Heavy faults in every site of copy 1 only: the vote must hide them completely.
    inj = inject(res.model, SiteSelection(names="/tmr1"))
    sess = InjectionSession(inj.model, "cpu")
    clean, plans = sess.clean({"x": x})
    faults = sample_faults(plans, 1e-3, trial_rng(0, 0, 0))
    assert len(faults) > 10
    np.testing.assert_array_equal(sess.run({"x": x}, faults, plans)[0], clean[0])

    # The same faults in the original model's block do change its output (the test can fail).
    inj0 = inject(model, SiteSelection(names=r"^/blocks\.0/"))
    sess0 = InjectionSession(inj0.model, "cpu")
    clean0, plans0 = sess0.clean({"x": x})
    faults0 = sample_faults(plans0, 1e-3, trial_rng(0, 0, 0))
    assert not np.array_equal(sess0.run({"x": x}, faults0, plans0)[0], clean0[0])


def test_tmr_without_match_changes_nothing():
    model = tiny_transformer()
    res = tmr(model, "no-such-node")
    assert res.skipped and len(res.model.graph.node) == len(model.graph.node)
