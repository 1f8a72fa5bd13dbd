"""Fault sites inside If branches and Loop/Scan bodies (docs/fault_model.md, "Sites in control flow").

Tiny inline models: the sites' ids name their path; operation counts follow the branch taken and
the iterations executed (expected counts computed by hand below); faults, sampled per execution,
match the dense reference (tests/reference.py) applied iteration by iteration; the number of flips
of a Loop site is Binomial(operations of all iterations x bits, BER).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import reference as R
from onnxft.faults.sampling import Faults, fault_feeds, sample_faults
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession
from test_inject_reference import assert_close
from test_sampling_stats import check_binomial

RTOL = 1e-5
B = 2  # items
RNG = np.random.default_rng(7)
W44 = (RNG.standard_normal((4, 4)) * 0.5).astype(np.float32)
W43 = RNG.standard_normal((4, 3)).astype(np.float32)


def vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, inits=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def session(m, fault_free_path=False):
    r = inject(m, fault_free_path=fault_free_path)
    onnx.checker.check_model(r.model, full_check=True)
    return InjectionSession(r.model, "cpu", threads=1)


def site_of(sess, name):
    hits = [i for i, s in enumerate(sess.table.sites) if s.node.endswith(name)]
    assert len(hits) == 1, (name, [s.node for s in sess.table.sites])
    return hits[0]


def only(f: Faults, site: int, execution: int | None = None) -> Faults:
    keep = f.site == site
    if execution is not None:
        keep &= f.execution == execution
    return f.subset(keep)


def gemm_rows(f: Faults, shape):
    return [(R.flat_element(i, e, shape), s, b) for i, e, s, b in zip(f.item, f.element, f.step, f.bit)]


def ew_rows(f: Faults, shape):
    return [(R.flat_element(i, e, shape), b) for i, e, b in zip(f.item, f.element, f.bit)]


# --------------------------------------------------------------------------------------------
# If
# --------------------------------------------------------------------------------------------


def if_model():
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["t0"], name="MatMul_3"),
                         h.make_node("Add", ["t0", "t0"], ["ty"], name="Add_1")], "then", [], [vi("ty", T.FLOAT, None)])
    other = h.make_graph([h.make_node("Mul", ["x", "x"], ["e0"], name="Mul_2"),
                          h.make_node("ReduceSum", ["e0"], ["ey"], name="ReduceSum_4", keepdims=1)], "else", [],
                         [vi("ey", T.FLOAT, None)])
    node = h.make_node("If", ["c"], ["y"], name="If_0", then_branch=then, else_branch=other)
    return model([node], [vi("x", T.FLOAT, ["B", 4]), vi("c", T.BOOL, [])], [vi("y", T.FLOAT, None)],
                 [nh.from_array(W43, "W")])


def test_if_sites_named_by_path_and_counted_from_the_branch_taken():
    sess = session(if_model())
    names = {s.node for s in sess.table.sites}
    assert names == {"If_0/then/MatMul_3", "If_0/then/Add_1", "If_0/else/Mul_2", "If_0/else/ReduceSum_4"}
    assert all(s.path.startswith("If_0/") and s.columns()[-1] == "execution" for s in sess.table.sites)
    x = RNG.standard_normal((B, 4)).astype(np.float32)
    by_name = lambda plans: {p.site.node.rsplit("/", 1)[1]: p.operations_per_item for p in plans}  # noqa: E731
    # then: [1, 4] @ [4, 3] per item = 3 outputs x (4 products + 3 sums); Add: 3 outputs
    assert by_name(sess.plans({"x": x, "c": np.array(True)})) == {"MatMul_3": 21, "Add_1": 3, "Mul_2": 0,
                                                                  "ReduceSum_4": 0}
    # else: Mul 4 elements; ReduceSum over everything (keepdims) has no batch axis: 1 output, 1 item
    plans = sess.plans({"x": x, "c": np.array(False)})
    assert by_name(plans) == {"MatMul_3": 0, "Add_1": 0, "Mul_2": 4, "ReduceSum_4": 1}
    assert [len(p.executions) for p in plans] == [1 if p.site.path == "If_0/else" else 0 for p in plans]


@pytest.mark.parametrize("fault_free_path", [False, True])
def test_if_branch_faults_match_reference(fault_free_path):
    sess = session(if_model(), fault_free_path)
    x = RNG.standard_normal((B, 4)).astype(np.float32)
    feeds = {"x": x, "c": np.array(True)}
    plans = sess.plans(feeds)
    clean = sess.run(feeds, Faults.empty())[0]
    np.testing.assert_array_equal(clean, (x @ W43) * 2)
    mm, add = site_of(sess, "MatMul_3"), site_of(sess, "Add_1")
    hand = Faults(np.array([mm, mm, add]), np.array([1, 0, 1]), np.array([2, 0, 1]), np.array([5, 1, 0]),
                  np.array([30, 23, 31]))
    for f in (hand, sample_faults(plans, 0.02, np.random.default_rng(3))):
        assert len(f) >= 3
        t0 = R.matmul_reference(x, W43, gemm_rows(only(f, mm), (B, 3)), "fp32")
        with np.errstate(all="ignore"):
            want = R.elementwise_reference(t0 + t0, ew_rows(only(f, add), (B, 3)), "fp32")
        assert_close(sess.run(feeds, f)[0], want, RTOL, "If then branch")


def test_fault_on_a_site_that_did_not_run_is_refused():
    sess = session(if_model())
    feeds = {"x": np.ones((B, 4), np.float32), "c": np.array(True)}
    plans = sess.plans(feeds)
    f = Faults(np.array([site_of(sess, "Mul_2")]), np.array([0]), np.array([0]), np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="ran 0 times"):
        fault_feeds(plans, f)


# --------------------------------------------------------------------------------------------
# Loop (and an If inside it), Scan
# --------------------------------------------------------------------------------------------


def loop_model(nested_if=False):
    """h_0 = x; h_{i+1} = [0.5 *, when i is even and nested_if] (h_i @ W) + x; outputs h_n and every h."""
    body_nodes = [h.make_node("MatMul", ["h", "W"], ["m"], name="MatMul_1")]
    if nested_if:
        then = h.make_graph([h.make_node("Mul", ["m", "half"], ["mt"], name="Mul_5")], "then", [],
                            [vi("mt", T.FLOAT, [None, 4])])
        other = h.make_graph([h.make_node("Identity", ["m"], ["me"])], "else", [], [vi("me", T.FLOAT, [None, 4])])
        body_nodes += [h.make_node("Mod", ["i", "two"], ["parity"]), h.make_node("Equal", ["parity", "zero"], ["even"]),
                       h.make_node("If", ["even"], ["m2"], name="If_3", then_branch=then, else_branch=other)]
    body_nodes += [h.make_node("Add", ["m2" if nested_if else "m", "x"], ["h2"], name="Add_1"),
                   h.make_node("Identity", ["cond"], ["cond_out"]), h.make_node("Identity", ["h2"], ["y"])]
    body = h.make_graph(body_nodes, "body",
                        [vi("i", T.INT64, []), vi("cond", T.BOOL, []), vi("h", T.FLOAT, [None, 4])],
                        [vi("cond_out", T.BOOL, []), vi("h2", T.FLOAT, [None, 4]), vi("y", T.FLOAT, [None, 4])])
    node = h.make_node("Loop", ["n", "", "x"], ["hn", "hs"], name="Loop_2", body=body)
    inits = [nh.from_array(W44, "W"), nh.from_array(np.array(0.5, np.float32), "half"),
             nh.from_array(np.array(2, np.int64), "two"), nh.from_array(np.array(0, np.int64), "zero")]
    return model([node], [vi("x", T.FLOAT, ["B", 4]), vi("n", T.INT64, [])],
                 [vi("hn", T.FLOAT, ["B", 4]), vi("hs", T.FLOAT, ["N", "B", 4])], inits)


def loop_reference(x, n, f, mm, add, mul=None):
    """The loop of ``loop_model`` one iteration at a time, each execution with its own faults."""
    hh, ys, mul_runs = x, [], 0
    with np.errstate(all="ignore"):
        for i in range(n):
            m = R.matmul_reference(hh, W44, gemm_rows(only(f, mm, i), (B, 4)), "fp32")
            if mul is not None and i % 2 == 0:
                m = R.elementwise_reference(m * np.float32(0.5), ew_rows(only(f, mul, mul_runs), (B, 4)), "fp32")
                mul_runs += 1
            hh = R.elementwise_reference(m + x, ew_rows(only(f, add, i), (B, 4)), "fp32")
            ys.append(hh)
    return hh, np.stack(ys)


def test_loop_sites_counted_from_iterations_executed():
    sess = session(loop_model())
    assert {s.node for s in sess.table.sites} == {"Loop_2/body/MatMul_1", "Loop_2/body/Add_1"}
    x = RNG.standard_normal((B, 4)).astype(np.float32)
    mm, add = site_of(sess, "MatMul_1"), site_of(sess, "Add_1")
    for n in (0, 1, 3):
        plans = sess.plans({"x": x, "n": np.array(n, np.int64)})
        # per item and iteration: MatMul 4 outputs x (4 products + 3 sums) = 28; Add 4
        assert plans[mm].operations_per_item == 28 * n and plans[add].operations_per_item == 4 * n
        assert len(plans[mm].executions) == n
        assert plans[mm].bits_per_item == n * 4 * (4 * 32 + 3 * 32)


@pytest.mark.parametrize("fault_free_path", [False, True])
def test_loop_faults_per_iteration_match_reference(fault_free_path):
    sess = session(loop_model(), fault_free_path)
    x = RNG.standard_normal((B, 4)).astype(np.float32)
    n = 3
    feeds = {"x": x, "n": np.array(n, np.int64)}
    plans = sess.plans(feeds)
    mm, add = site_of(sess, "MatMul_1"), site_of(sess, "Add_1")
    clean = sess.run(feeds, Faults.empty())
    want = loop_reference(x, n, Faults.empty(), mm, add)
    for got, ref in zip(clean, want):
        assert_close(got, ref, RTOL, "fault-free loop")
    # hand faults in the first and last iterations (a product, a partial sum, the sign of a sum)
    hand = Faults(np.array([mm, mm, add, add]), np.array([0, 1, 1, 0]), np.array([1, 3, 2, 0]),
                  np.array([2, 5, 0, 0]), np.array([27, 30, 31, 22]), execution=np.array([0, 2, 2, 1]))
    sampled = sample_faults(plans, 0.004, np.random.default_rng(11))
    assert len(sampled) >= 8 and len(set(sampled.execution.tolist())) > 1
    for f in (hand, sampled):
        got = sess.run(feeds, f)
        for g, ref, what in zip(got, loop_reference(x, n, f, mm, add), ("h_n", "every h")):
            assert_close(g, ref, RTOL, what)


def test_if_nested_in_loop_counts_its_own_executions():
    sess = session(loop_model(nested_if=True))
    mul = site_of(sess, "Mul_5")
    assert sess.table.sites[mul].node == "Loop_2/body/If_3/then/Mul_5"
    x = RNG.standard_normal((B, 4)).astype(np.float32)
    n = 5
    feeds = {"x": x, "n": np.array(n, np.int64)}
    plans = sess.plans(feeds)
    assert len(plans[mul].executions) == 3 and plans[mul].operations_per_item == 3 * 4  # iterations 0, 2, 4
    mm, add = site_of(sess, "MatMul_1"), site_of(sess, "Add_1")
    hand = Faults(np.array([mul, mul, mm]), np.array([0, 1, 1]), np.array([1, 3, 0]), np.array([0, 0, 4]),
                  np.array([30, 29, 30]), execution=np.array([1, 2, 3]))
    for f in (hand, sample_faults(plans, 0.003, np.random.default_rng(5))):
        got = sess.run(feeds, f)
        for g, ref in zip(got, loop_reference(x, n, f, mm, add, mul)):
            assert_close(g, ref, RTOL, "If inside Loop")


def test_scan_body_site():
    body = h.make_graph([h.make_node("Mul", ["s", "xt"], ["s2"], name="Mul_0"), h.make_node("Identity", ["s2"], ["y"])],
                        "body", [vi("s", T.FLOAT, [None, 4]), vi("xt", T.FLOAT, [None, 4])],
                        [vi("s2", T.FLOAT, [None, 4]), vi("y", T.FLOAT, [None, 4])])
    node = h.make_node("Scan", ["s0", "xs"], ["sn", "ys"], name="Scan_1", body=body, num_scan_inputs=1)
    m = model([node], [vi("s0", T.FLOAT, ["B", 4]), vi("xs", T.FLOAT, ["N", "B", 4])],
              [vi("sn", T.FLOAT, ["B", 4]), vi("ys", T.FLOAT, ["N", "B", 4])])
    sess = session(m)
    assert [s.node for s in sess.table.sites] == ["Scan_1/body/Mul_0"]
    s0 = RNG.standard_normal((B, 4)).astype(np.float32)
    xs = RNG.standard_normal((4, B, 4)).astype(np.float32)
    feeds = {"s0": s0, "xs": xs}
    plans = sess.plans(feeds)
    assert len(plans[0].executions) == 4 and plans[0].operations_per_item == 16
    f = sample_faults(plans, 0.02, np.random.default_rng(2))
    assert len(f) >= 4
    s, ys = s0, []
    for e in range(4):
        s = R.elementwise_reference(s * xs[e], ew_rows(only(f, 0, e), (B, 4)), "fp32")
        ys.append(s)
    got = sess.run(feeds, f)
    assert_close(got[0], s, RTOL, "Scan state")
    assert_close(got[1], np.stack(ys), RTOL, "Scan outputs")


def test_loop_site_flip_count_is_binomial_over_all_iterations():
    sess = session(loop_model())
    n = 3
    plans = sess.plans({"x": np.ones((B, 4), np.float32), "n": np.array(n, np.int64)})
    mm = site_of(sess, "MatMul_1")
    ber = 2e-3
    bits = n * 4 * (4 * 32 + 3 * 32)  # per item, all iterations
    rng = np.random.default_rng(2024)
    counts, per_execution = [], np.zeros(n)
    for _ in range(3000):
        f = sample_faults(plans, ber, rng)
        sel = (f.site == mm) & (f.item == 0)
        counts.append(int(sel.sum()))
        per_execution += np.bincount(f.execution[sel], minlength=n)
    check_binomial(np.array(counts), bits, ber, "Loop MatMul site, item 0")
    # every iteration gets its share (same shapes here: a third each)
    expected = 3000 * bits * ber / n
    assert np.all(np.abs(per_execution - expected) < 4.5 * np.sqrt(expected))


def test_a_control_flow_sites_scale_rules_its_executions():
    from dataclasses import replace

    sess = session(loop_model())
    plans = sess.plans({"x": np.ones((B, 4), np.float32), "n": np.array(3, np.int64)})
    mm = site_of(sess, "MatMul_1")
    protected = [replace(p, site=replace(p.site, scale=0.0)) if i == mm else p for i, p in enumerate(plans)]
    f = sample_faults(protected, 0.05, np.random.default_rng(0))
    assert len(f) > 0 and not np.any(f.site == mm)
