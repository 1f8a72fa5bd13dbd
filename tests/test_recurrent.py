"""LSTM, GRU and RNN decomposed into a Loop of primitives (passes/decompose.py, "recurrent ops").

Fault-free, the decomposition equals onnxruntime's fused op within float32 rounding (random
weights, every direction, with and without biases and initial states, constant or run-time
weights, layout 0 and 1, both GRU reset forms). With faults, the gate products (X·W^T outside the
loop, H·R^T in each step) and the cell updates match a numpy cell whose faulted operations are
the dense reference's (tests/reference.py), one time step per execution.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import reference as R
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.passes.decompose import decompose
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession
from test_inject_reference import assert_close

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
S, B, I, H = 4, 2, 3, 4


def rnn_model(kind, direction="forward", layout=0, bias=True, h0=True, const=True, lbr=0, seed=0):
    """A one-node model and its feeds (weights from ``seed``: layouts 0 and 1 share them)."""
    rng = np.random.default_rng(seed)
    G, D = GATES[kind], 2 if direction == "bidirectional" else 1
    W = (rng.standard_normal((D, G * H, I)) * 0.5).astype(np.float32)
    Rw = (rng.standard_normal((D, G * H, H)) * 0.5).astype(np.float32)
    Bw = (rng.standard_normal((D, 2 * G * H)) * 0.5).astype(np.float32)
    xs, hs = ([S, B, I], [D, B, H]) if layout == 0 else ([B, S, I], [B, D, H])
    feeds = {"X": rng.standard_normal(xs).astype(np.float32)}
    inputs = [h.make_tensor_value_info("X", T.FLOAT, xs)]
    ins = ["X", "W", "R", "B" if bias else "", "", "h0" if h0 else ""]
    ins += ["c0" if h0 else ""] if kind == "LSTM" else []
    for name in ("h0", "c0") if kind == "LSTM" else ("h0",):
        feeds[name] = rng.standard_normal(hs).astype(np.float32)
        if h0:
            inputs.append(h.make_tensor_value_info(name, T.FLOAT, hs))
    feeds = {k: v for k, v in feeds.items() if k == "X" or h0}
    outs = ["Y", "Yh"] + (["Yc"] if kind == "LSTM" else [])
    attrs = dict(hidden_size=H, direction=direction, layout=layout)
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    weights = {"W": W, "R": Rw, "B": Bw}
    inits = [nh.from_array(v, k) for k, v in weights.items()] if const else []
    if not const:
        inputs += [h.make_tensor_value_info(k, T.FLOAT, list(v.shape)) for k, v in weights.items()]
        feeds.update(weights)
    g = h.make_graph([h.make_node(kind, ins, outs, name=kind, **attrs)], "g", inputs,
                     [h.make_tensor_value_info(o, T.FLOAT, [None] * (4 if o == "Y" else 3)) for o in outs], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 22)], ir_version=10), feeds, weights


def ort_run(model, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def fused_reference(kind, direction, layout, **kw):
    """onnxruntime's fused op; for layout 1 (which it does not run) the layout-0 op on transposed data."""
    m, feeds, _ = rnn_model(kind, direction, layout, **kw)
    if layout == 0:
        return ort_run(m, feeds)
    m0, _, _ = rnn_model(kind, direction, 0, **kw)
    out = ort_run(m0, {k: (np.swapaxes(v, 0, 1) if k in ("X", "h0", "c0") else v) for k, v in feeds.items()})
    return [np.transpose(out[0], (2, 0, 1, 3))] + [np.swapaxes(o, 0, 1) for o in out[1:]]


CASES = [(k, d, lay, kw) for k in ("LSTM", "GRU", "RNN") for d in ("forward", "reverse", "bidirectional")
         for lay, kw in ((0, {}), (0, {"bias": False, "h0": False}), (0, {"const": False}), (1, {}))]
CASES += [("GRU", d, 0, {"lbr": 1}) for d in ("forward", "bidirectional")]


@pytest.mark.parametrize("kind,direction,layout,kw", CASES)
def test_decomposed_equals_fused(kind, direction, layout, kw):
    m, feeds, _ = rnn_model(kind, direction, layout, **kw)
    r = decompose(m)
    assert len(r.inserted) == 1 and r.skipped == []
    onnx.checker.check_model(r.model, full_check=True)
    ops = {n.op_type for n in r.model.graph.node}
    assert kind not in ops and "Loop" in ops
    got, want = ort_run(r.model, feeds), fused_reference(kind, direction, layout, **kw)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) < 2e-6  # float32 rounding (measured <= 2.9e-7)


@pytest.mark.parametrize("attrs,inputs,reason", [
    ({"activations": ["Relu", "Tanh", "Tanh"]}, {}, "activations"),
    ({"clip": 5.0}, {}, "clip"),
    ({"input_forget": 1}, {}, "input_forget"),
    ({}, {4: "lens"}, "sequence_lens"),
])
def test_unsupported_attributes_are_skipped_with_a_reason(attrs, inputs, reason):
    m, _, _ = rnn_model("LSTM")
    node = m.graph.node[0]
    for k, v in attrs.items():
        node.attribute.append(h.make_attribute(k, v))
    for i, name in inputs.items():
        node.input[i] = name
        m.graph.input.append(h.make_tensor_value_info(name, T.INT32, [B]))
    r = decompose(m)
    assert r.inserted == [] and len(r.skipped) == 1 and reason in r.skipped[0][1]


def test_full_constant_sequence_lens_is_accepted():
    m, feeds, _ = rnn_model("LSTM")
    m.graph.node[0].input[4] = "lens"
    m.graph.initializer.append(nh.from_array(np.full(B, S, np.int32), "lens"))
    r = decompose(m)
    assert len(r.inserted) == 1
    assert float(np.abs(ort_run(r.model, feeds)[0] - ort_run(m, feeds)[0]).max()) < 2e-6


# --------------------------------------------------------------------------------------------
# faults in the decomposed cells against the dense reference
# --------------------------------------------------------------------------------------------


def sites_by_output(sess):
    return {s.output: i for i, s in enumerate(sess.table.sites)}


def only(f: Faults, site: int, execution: int = 0) -> Faults:
    return f.subset((f.site == site) & (f.execution == execution))


PER_ITEM: dict = {}  # site -> output elements per item of its plan (set by the test)


def flat(f, site):
    return [int(i) * PER_ITEM[site] + int(e) for i, e in zip(f.item, f.element)]


def gemm_rows(f, site):
    return [(o, s, b) for o, s, b in zip(flat(f, site), f.step, f.bit)]


def ew_rows(f, site):
    return [(o, b) for o, b in zip(flat(f, site), f.bit)]


def sigmoid(x):
    with np.errstate(over="ignore"):
        return np.reciprocal(np.float32(1) + np.exp(-x))


def lstm_reference(x, W, Rw, Bw, h0, c0, f, xw_site, hr_site, c_site):
    """Forward LSTM with the decomposition's operations; faults at X·W^T, H·R^T and c_t."""
    wt, rt = W[0].T, Rw[0].T
    xw = R.matmul_reference(x, wt, gemm_rows(only(f, xw_site), xw_site), "fp32")
    xwb = xw + (Bw[0, :4 * H] + Bw[0, 4 * H:])
    hh, cc, ys = h0[0], c0[0], []
    for t in range(S):
        g = xwb[t] + R.matmul_reference(hh, rt, gemm_rows(only(f, hr_site, t), hr_site), "fp32")
        i, o, fg, cand = sigmoid(g[:, :H]), sigmoid(g[:, H:2 * H]), sigmoid(g[:, 2 * H:3 * H]), np.tanh(g[:, 3 * H:])
        cc = R.elementwise_reference(fg * cc + i * cand, ew_rows(only(f, c_site, t), c_site), "fp32")
        hh = o * np.tanh(cc)
        ys.append(hh)
    return np.stack(ys)[:, None], hh[None], cc[None]


def gru_reference(x, W, Rw, Bw, h0, f, xw_site, hr_site, h_site):
    """Forward GRU (linear_before_reset=1, as PyTorch exports it); faults at X·W^T, H·R^T, h_t."""
    xw = R.matmul_reference(x, W[0].T, gemm_rows(only(f, xw_site), xw_site), "fp32")
    xwb = xw + Bw[0, :3 * H]
    hh, ys = h0[0], []
    for t in range(S):
        hr = R.matmul_reference(hh, Rw[0].T, gemm_rows(only(f, hr_site, t), hr_site), "fp32") + Bw[0, 3 * H:]
        zr = xwb[t][:, :2 * H] + hr[:, :2 * H]
        z, r = sigmoid(zr[:, :H]), sigmoid(zr[:, H:])
        cand = np.tanh(xwb[t][:, 2 * H:] + r * hr[:, 2 * H:])
        hh = R.elementwise_reference((np.float32(1) - z) * cand + z * hh, ew_rows(only(f, h_site, t), h_site), "fp32")
        ys.append(hh)
    return np.stack(ys)[:, None], hh[None]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_faults_in_decomposed_cell_match_reference(kind):
    m, feeds, w = rnn_model(kind, lbr=1)
    sess = InjectionSession(inject(m).model, "cpu", threads=1)
    by_out = sites_by_output(sess)
    xw_site, hr_site = by_out["Y/xw0"], by_out["Y/hr0"]
    upd_site = by_out["Y/c0_new" if kind == "LSTM" else "Y/h0_new"]
    assert sess.table.sites[hr_site].node == f"{kind}/Loop0/body/{kind}/MatMul_1"
    plans = sess.plans(feeds)
    assert len(plans[hr_site].executions) == S and plans[xw_site].executions is None
    # H·R^T per step: B x G*H outputs x (H products + H-1 sums). (Items here: the sampler takes
    # axis 0 of the first input, the time axis of X, as the batch; [B, 4H] is then one item.)
    plan = plans[hr_site]
    assert plan.operations_per_item * plan.items == S * B * GATES[kind] * H * (2 * H - 1)
    PER_ITEM.update({i: plans[i].elements for i in (xw_site, hr_site, upd_site)})
    sampled = sample_faults(plans, 2e-3, np.random.default_rng(4))
    keep = np.isin(sampled.site, [xw_site, hr_site, upd_site])
    hand = Faults(np.array([hr_site, hr_site, upd_site, xw_site]), np.array([0, 0, 0, 1]), np.array([5, 18, 7, 7]),
                  np.array([1, 6, 0, 2]), np.array([29, 30, 23, 27]), execution=np.array([0, 3, 2, 0]))
    for f in (hand, sampled.subset(keep)):
        assert len(f) >= 4 and len(set(f.execution.tolist())) > 1
        if kind == "LSTM":
            want = lstm_reference(feeds["X"], w["W"], w["R"], w["B"], feeds["h0"], feeds["c0"], f, xw_site, hr_site,
                                  upd_site)
        else:
            want = gru_reference(feeds["X"], w["W"], w["R"], w["B"], feeds["h0"], f, xw_site, hr_site, upd_site)
        with np.errstate(all="ignore"):
            got = sess.run(feeds, f)
        for g, r, what in zip(got, want, ("Y", "Y_h", "Y_c")):
            assert_close(g, r, 1e-5, f"{kind} {what}")


def test_lstm_inside_if_runs_its_loop_only_when_the_branch_is_taken():
    """The recurrent Loop nested in an If (as in silero VAD): its sites count S executions when the
    branch runs and none when it does not; faults still match the dense reference."""
    m, feeds, w = rnn_model("LSTM")
    g = m.graph
    rank = {"Y": 4, "Yh": 3, "Yc": 3}
    then = h.make_graph(list(g.node), "then", [],
                        [h.make_tensor_value_info(o.name, T.FLOAT, [None] * rank[o.name]) for o in g.output])
    other = h.make_graph([h.make_node("Identity", ["X"], [f"{o.name}_else"]) for o in g.output], "else", [],
                         [h.make_tensor_value_info(f"{o.name}_else", T.FLOAT, [None] * 3) for o in g.output])
    node = h.make_node("If", ["c"], [f"out_{o.name}" for o in g.output], name="If_0", then_branch=then,
                       else_branch=other)
    wrapped = h.make_graph([node], "g", list(g.input) + [h.make_tensor_value_info("c", T.BOOL, [])],
                           [h.make_tensor_value_info(f"out_{o.name}", T.FLOAT, [None] * rank[o.name])
                            for o in g.output],
                           list(g.initializer))
    m2 = h.make_model(wrapped, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    r = inject(m2)
    onnx.checker.check_model(r.model, full_check=True)
    sess = InjectionSession(r.model, "cpu", threads=1)
    by_out = sites_by_output(sess)
    xw_site, hr_site, c_site = by_out["Y/xw0"], by_out["Y/hr0"], by_out["Y/c0_new"]
    assert sess.table.sites[hr_site].node == "If_0/then/LSTM/Loop0/body/LSTM/MatMul_1"
    off = sess.plans({**feeds, "c": np.array(False)})
    assert all(len(p.executions) == 0 for p in off)
    on_feeds = {**feeds, "c": np.array(True)}
    plans = sess.plans(on_feeds)
    assert len(plans[hr_site].executions) == S and len(plans[xw_site].executions) == 1
    for got, want in zip(sess.run(on_feeds, Faults.empty()), ort_run(m, feeds)):
        assert float(np.abs(got - want).max()) < 2e-6
    PER_ITEM.update({i: plans[i].elements for i in (xw_site, hr_site, c_site)})
    f = sample_faults(plans, 2e-3, np.random.default_rng(9))
    f = f.subset(np.isin(f.site, [xw_site, hr_site, c_site]))
    assert len(f) >= 4
    want = lstm_reference(feeds["X"], w["W"], w["R"], w["B"], feeds["h0"], feeds["c0"], f, xw_site, hr_site, c_site)
    with np.errstate(all="ignore"):
        got = sess.run(on_feeds, f)
    for g_, r_, what in zip(got, want, ("Y", "Y_h", "Y_c")):
        assert_close(g_, r_, 1e-5, f"LSTM in If {what}")
