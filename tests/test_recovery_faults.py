"""Faults in ABFT recovery (``SiteSelection(include_protection=True)``, ``--inject-protection``).

Each ABFT unit's recovery is a virtual site sampled as a full recompute of the unit; its faults
are applied only to the elements a run recomputes. With fixed fault lists on tiny hardened models:
a main-site fault makes the unit recompute a known region (one element, a whole matrix, a block,
an item); recovery faults inside it must give the numpy reference (the recomputed GEMM with those
faults applied, ``custom_ops.reference``); recovery faults outside it must change nothing, bit for
bit. Over many trials the number of applied recovery faults has the mean of
Binomial(recomputed operations x bits, BER).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from custom_ops.reference import REFERENCES
from onnxft.campaigns.evaluate import faults_from_record
from onnxft.faults.sampling import Faults, sample_faults, site_tables
from onnxft.faults.sites import SiteTable
from onnxft.passes.abft import abft
from onnxft.passes.inject import SiteSelection, inject
from onnxft.runtime.session import InjectionSession

RTOL = 1e-5
RNG = np.random.default_rng(11)
W = RNG.standard_normal((8, 12)).astype(np.float32)
BIAS = RNG.standard_normal(12).astype(np.float32)
CW = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
CB = RNG.standard_normal(3).astype(np.float32)
SCALE = np.float32(0.5)


def make(nodes, inputs, outputs, inits=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def linear():
    """torch Linear: MatMul of a constant weight + bias Add (one unit; the bias is added after
    the recompute, and the recovery's faults land before it, as at the GEMM site)."""
    return make([h.make_node("MatMul", ["a", "w"], ["y"], name="mm"), h.make_node("Add", ["y", "bias"], ["out"])],
                [h.make_tensor_value_info("a", T.FLOAT, ["n", 6, 8])], [h.make_tensor_value_info("out", T.FLOAT, ["n", 6, 12])],
                [nh.from_array(W, "w"), nh.from_array(BIAS, "bias")])


def scores():
    """Attention scores q @ k * c: batched activation operands, the scaling absorbed in the unit
    (recovery multiplies by k * c)."""
    return make([h.make_node("MatMul", ["q", "k"], ["s"], name="qk"), h.make_node("Mul", ["s", "c"], ["out"])],
                [h.make_tensor_value_info("q", T.FLOAT, ["n", 2, 6, 4]), h.make_tensor_value_info("k", T.FLOAT, ["n", 2, 4, 10])],
                [h.make_tensor_value_info("out", T.FLOAT, ["n", 2, 6, 10])], [nh.from_array(SCALE, "c")])


def conv():
    return make([h.make_node("Conv", ["x", "cw", "cb"], ["out"], name="conv", pads=[1, 1, 1, 1])],
                [h.make_tensor_value_info("x", T.FLOAT, ["n", 2, 5, 5])], [h.make_tensor_value_info("out", T.FLOAT, ["n", 3, 5, 5])],
                [nh.from_array(CW, "cw"), nh.from_array(CB, "cb")])


def session(model, scheme, block_size="auto", **kw):
    hardened = abft(model, scheme=scheme, block_size=block_size).model
    graph = inject(hardened, SiteSelection(include_protection=True), logging=True, **kw).model
    onnx.checker.check_model(graph, full_check=True)
    return InjectionSession(graph, "cpu", threads=1)


def site_index(sess, node, recovery):
    return next(i for i, s in enumerate(sess.table.sites) if (s.recovery_of == node if recovery else s.node == node))


def faults(site, rows):
    """Faults at ``site``: rows of (item, element, step, bit)."""
    r = np.array(rows, np.int64).reshape(-1, 4)
    return Faults(np.full(len(r), site, np.int64), r[:, 0], r[:, 1], r[:, 2], r[:, 3])


def close(got, want):
    return np.all(np.abs(got - want) <= RTOL * np.maximum(np.abs(want), 1))


def check(sess, feeds, node, main_rows, rec_rows, recomputed, operands, reference, bias=None, clean_is_y=False,
          ref_extra=()):
    """Run the main faults alone, then with the recovery faults; ``recomputed``: the (item,
    element) pairs the main faults make the unit recompute; ``operands``: (A, B) the recompute
    multiplies; ``reference``: the custom_ops reference to apply the applied faults with (and
    ``ref_extra``, its inputs after the table)."""
    main, rec = site_index(sess, node, False), site_index(sess, node, True)
    assert sess.table.sites[rec].kind == sess.table.sites[main].kind
    clean, plans = sess.clean(feeds)
    clean = clean[0]
    f_main, f_rec = faults(main, main_rows), faults(rec, rec_rows)
    out_main = sess.run(feeds, f_main, plans)[0]
    assert close(out_main, clean)  # ABFT recovered the main faults
    outs, logs = sess.run(feeds, Faults.concat([f_main, f_rec]), plans, with_log=True)
    out = outs[0]
    applied = np.array([(i, e) in recomputed for i, e in zip(f_rec.item.tolist(), f_rec.element.tolist())])
    assert applied.any() and not applied.all()
    # the reference: the recompute's clean values with the applied faults, sequentially
    a, b = operands
    feeds_ref, _ = site_tables(plans[rec], f_rec.subset(applied))
    names = sess.table.sites[rec].input_names()
    y0 = clean if clean_is_y else np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)
    extra = [feeds_ref[names[k]] for k in ("a_off", "b_off", "dh", "dw")] + [CB] if "a_off" in names else list(ref_extra)
    want, _ = REFERENCES[reference](a, b, y0, feeds_ref[names["faults"]], *extra)
    if bias is not None:
        want = want + bias
    hit = np.zeros(out.shape[0] * plans[rec].elements, bool)
    hit[f_rec.item[applied] * plans[rec].elements + f_rec.element[applied]] = True
    hit = hit.reshape(out.shape)
    assert close(out[hit], want[hit])
    assert np.any(out[hit] != out_main[hit])  # the applied faults did something
    # everything else, recovery faults on elements not recomputed included: bit for bit unchanged
    np.testing.assert_array_equal(out[~hit].view(np.uint32), out_main[~hit].view(np.uint32))
    # the log: one row per table row, "applied" exactly where the element was recomputed
    log = logs[sess.table.sites[rec].log_output()]
    _, (o, _, _) = site_tables(plans[rec], f_rec)
    want_applied = [divmod(int(x), plans[rec].elements) in recomputed for x in o]
    assert log[:, 2].astype(bool).tolist() == want_applied
    assert np.isnan(log[~log[:, 2].astype(bool), :2]).all() and not np.isnan(log[log[:, 2].astype(bool), :2]).any()
    return out


K = 8
FINAL = 2 * K - 2  # step of the final sum of an 8-term dot product


@pytest.mark.parametrize("fast", [False, True])
def test_standard_single_element_and_whole_matrix(fast):
    """Item 0: one faulty element -> that element recomputed (its dot product); item 1: two faulty
    rows and columns -> the whole matrix recomputed; item 2: nothing recomputed."""
    sess = session(linear(), "standard", fault_free_path=fast, transposed_weights=fast)
    a = RNG.standard_normal((3, 6, 8)).astype(np.float32)
    e = lambda i, j: i * 12 + j  # noqa: E731
    main = [(0, e(2, 5), FINAL, 30), (1, e(1, 3), FINAL, 30), (1, e(4, 7), 3, 30)]
    recomputed = {(0, e(2, 5))} | {(1, x) for x in range(72)}
    rec = [(0, e(2, 5), 3, 27), (0, e(2, 5), K + 4, 26),  # a product and a partial sum of the recomputed element
           (0, e(2, 6), 2, 29), (0, e(3, 5), FINAL, 29),  # same row / column, not recomputed
           (1, e(0, 0), 0, 28), (1, e(5, 11), K + 1, 24), (1, e(5, 11), FINAL, 22), (1, e(1, 3), 4, 25),
           (2, e(2, 5), 1, 29), (2, e(0, 0), FINAL, 30)]  # item 2 recomputes nothing
    check(sess, {"a": a}, "mm", main, rec, recomputed, (a, W), "GemmFaults_fp32", bias=BIAS)


@pytest.mark.parametrize("fast", [False, True])
def test_lb_recomputed_block_only(fast):
    """LB with 4 x 4 blocks over 6 x 12: a fault at (5, 9) recomputes block (1, 2) = rows 4-5 (an
    edge block: its clamped duplicate rows count once), columns 8-11."""
    sess = session(linear(), "lb", block_size=4, fault_free_path=fast, transposed_weights=fast)
    a = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    e = lambda i, j: i * 12 + j  # noqa: E731
    main = [(0, e(5, 9), FINAL, 30)]
    recomputed = {(0, e(i, j)) for i in (4, 5) for j in range(8, 12)}
    rec = [(0, e(5, 9), 2, 27), (0, e(4, 8), K + 2, 28), (0, e(5, 11), FINAL, 25),
           (0, e(3, 9), 1, 29), (0, e(5, 7), FINAL, 29), (1, e(5, 9), 0, 29)]
    check(sess, {"a": a}, "mm", main, rec, recomputed, (a, W), "GemmFaults_fp32", bias=BIAS)


def test_standard_batched_scaled_scores():
    """Batched activation operands and an absorbed scaling: recovery multiplies q by k * c, and its
    faults are those of that product (BatchedGemmFaults on the same operands)."""
    sess = session(scores(), "standard")
    q = RNG.standard_normal((2, 2, 6, 4)).astype(np.float32)
    k = RNG.standard_normal((2, 2, 4, 10)).astype(np.float32)
    e = lambda hd, i, j: hd * 60 + i * 10 + j  # noqa: E731
    final = 2 * 4 - 2
    main = [(0, e(1, 3, 7), final, 30), (1, e(0, 0, 1), final, 30), (1, e(0, 2, 4), final, 30)]
    recomputed = {(0, e(1, 3, 7))} | {(1, e(0, i, j)) for i in range(6) for j in range(10)}
    rec = [(0, e(1, 3, 7), 1, 27), (0, e(0, 3, 7), 1, 27), (1, e(0, 5, 9), 4, 26), (1, e(1, 5, 9), 4, 26)]
    check(sess, {"q": q, "k": k}, "qk", main, rec, recomputed, (q, k * SCALE), "BatchedGemmFaults_fp32")


def test_conv_recomputed_item_only():
    """Conv units recompute whole items: recovery faults (the bias add included) land only in the
    recomputed item."""
    sess = session(conv(), "lb")
    x = RNG.standard_normal((3, 2, 5, 5)).astype(np.float32)
    kc = 2 * 9
    main = [(1, 40, 2 * kc - 2, 30)]
    recomputed = {(1, j) for j in range(75)}
    rec = [(1, 12, 4, 27), (1, 40, kc + 3, 26), (1, 74, 2 * kc - 1, 25),  # a product, a partial sum, the bias add
           (0, 12, 4, 27), (2, 40, 2 * kc - 1, 29)]
    check(sess, {"x": x}, "conv", main, rec, recomputed, (x, CW), "ConvFaults_fp32", clean_is_y=True)


def test_lb_int8_qdq_recovery_faults_are_integer_faults():
    """A QDQ unit recomputes a product of DequantizeLinear outputs: its recovery site is an int8
    site (16-bit products, 32-bit sums) like the unit's GEMM, faulted on the integer operands."""
    wq = RNG.integers(-128, 128, (8, 12)).astype(np.int8)
    qp = [nh.from_array(np.float32(0.05), "sa"), nh.from_array(np.int8(3), "za"),
          nh.from_array(np.float32(0.02), "sw"), nh.from_array(np.int8(0), "zw"), nh.from_array(wq, "wq")]
    model = make([h.make_node("DequantizeLinear", ["aq", "sa", "za"], ["a"]),
                  h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"]),
                  h.make_node("MatMul", ["a", "w"], ["out"], name="mm")],
                 [h.make_tensor_value_info("aq", T.INT8, ["n", 6, 8])], [h.make_tensor_value_info("out", T.FLOAT, ["n", 6, 12])],
                 qp)
    sess = session(model, "lb", block_size=4)
    rec = site_index(sess, "mm", True)
    assert sess.table.sites[rec].format == "int8" and sess.table.sites[rec].widths == {"product": 16, "sum": 32}
    aq = RNG.integers(-128, 128, (2, 6, 8)).astype(np.int8)
    e = lambda i, j: i * 12 + j  # noqa: E731
    recomputed = {(1, e(i, j)) for i in range(4) for j in range(4)}
    rec_rows = [(1, e(1, 2), 3, 12), (1, e(3, 0), K + 5, 20), (1, e(3, 5), 3, 12), (0, e(1, 2), 3, 12)]
    check(sess, {"aq": aq}, "mm", [(1, e(2, 3), FINAL, 30)], rec_rows, recomputed, (aq, wq), "GemmFaults_int",
          clean_is_y=True, ref_extra=(np.int8(3), np.int8(0), np.float32(0.05), np.float32(0.02)))


def test_recovery_faults_without_detection_change_nothing():
    """Recovery faults alone: no check fires, nothing is recomputed, the output is the clean one."""
    for scheme in ("standard", "lb"):
        sess = session(linear(), scheme, fault_free_path=True, transposed_weights=True)
        feeds = {"a": RNG.standard_normal((2, 6, 8)).astype(np.float32)}
        clean, plans = sess.clean(feeds)
        rec = site_index(sess, "mm", True)
        f = sample_faults(plans, 3e-3, np.random.default_rng(0))
        f = f.subset(f.site == rec)
        assert len(f) > 20
        out, logs = sess.run(feeds, f, plans, with_log=True)
        np.testing.assert_array_equal(out[0].view(np.uint32), clean[0].view(np.uint32))
        log = logs[sess.table.sites[rec].log_output()]
        # a row per table row: the fault-free fast path counted the recovery table and ran the injection graph
        assert len(log) == len(site_tables(plans[rec], f)[1][0]) and not log[:, 2].any()


def test_without_inject_protection_recovery_is_no_site():
    """Without include_protection the ABFT If is emitted as harden wrote it and no site is virtual;
    with it, one recovery site per unit."""
    hardened = abft(linear(), scheme="lb").model
    plain = inject(hardened).model
    sites = SiteTable.from_model(plain).sites
    assert not any(s.recovery_of for s in sites) and not any(s.node.startswith("onnxft.abft/") for s in sites)
    abft_if = next(n for n in plain.graph.node if n.op_type == "If")
    then = next(a.g for a in abft_if.attribute if a.name == "then_branch")
    assert not any(n.op_type == "If" for n in then.node)  # no recovery gate
    assert len(abft_if.output) == 2  # no log output
    with_prot = inject(hardened, SiteSelection(include_protection=True)).model
    assert [s.recovery_of for s in SiteTable.from_model(with_prot).sites if s.recovery_of] == ["mm"]


@pytest.mark.parametrize("scheme,block,main,ops_elements", [
    ("standard", "auto", [(0, 29, 14, 30), (1, 15, 14, 30), (1, 52, 14, 30)], 1 + 72),  # one element + matrix 1
    ("lb", 4, [(0, 69, 14, 30)], 8),  # the edge block (1, 2): 2 distinct rows x 4 columns
])
def test_applied_recovery_faults_are_binomial_in_recomputed_operations(scheme, block, main, ops_elements):
    """With the main faults fixed, the recovery faults that take effect over many trials have the
    mean of Binomial(recomputed elements x (2K - 1) operations x 32 bits, BER)."""
    sess = session(linear(), scheme, block_size=block, fault_free_path=True, transposed_weights=True)
    feeds = {"a": RNG.standard_normal((3, 6, 8)).astype(np.float32)}
    _, plans = sess.clean(feeds)
    m, rec = site_index(sess, "mm", False), site_index(sess, "mm", True)
    ber, trials = 2e-3, 150
    rng = np.random.default_rng(3)
    counts = []
    for _ in range(trials):
        f = sample_faults(plans, ber, rng)
        f = f.subset(f.site == rec)
        _, logs = sess.run(feeds, Faults.concat([faults(m, main), f]), plans, with_log=True)
        applied = logs[sess.table.sites[rec].log_output()][:, 2].astype(bool)
        _, (_, _, masks) = site_tables(plans[rec], f)  # one log row per table row: count its bits
        counts.append(sum(bin(int(x)).count("1") for x in masks[applied]))
    n_bits = ops_elements * (2 * K - 1) * 32
    mean, var = n_bits * ber, n_bits * ber * (1 - ber)
    z = (np.mean(counts) - mean) / math.sqrt(var / trials)
    assert abs(z) < 4.5, (np.mean(counts), mean)


def test_fault_log_replays_recovery_faults():
    """The fault log records recovery faults with "applied"; the record rebuilds the same faults."""
    from onnxft.campaigns.evaluate import _log_record
    from onnxft.runtime.data import Dataset

    sess = session(linear(), "standard", fault_free_path=True, transposed_weights=True)
    feeds = {"a": RNG.standard_normal((2, 6, 8)).astype(np.float32)}
    _, plans = sess.clean(feeds)
    rec_site = site_index(sess, "mm", True)
    drawn = sample_faults(plans, 1e-3, np.random.default_rng(5))
    f = Faults.concat([faults(site_index(sess, "mm", False), [(0, 29, FINAL, 30)]),  # item 0 recomputes element 29
                       faults(rec_site, [(0, 29, 3, 27)]), drawn.subset(drawn.site == rec_site)])
    out, logs = sess.run(feeds, f, plans, with_log=True)
    data = Dataset({"a": feeds["a"]}, None, None)
    rec = _log_record(sess, "m", data, 0, 2, 1e-3, 0, 0, 0, f, plans, logs, out[0])
    rows = [r for r in rec["faults"] if r["node"] == "mm/recovery"]
    assert rows and {r["applied"] for r in rows} == {True, False}
    assert all((r["original"] is None) == (not r["applied"]) for r in rows)
    again = faults_from_record(rec, sess.table)
    np.testing.assert_array_equal(sess.run(feeds, again, plans)[0].view(np.uint32), out[0].view(np.uint32))
