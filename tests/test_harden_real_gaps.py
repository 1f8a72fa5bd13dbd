"""harden on the shapes of pretrained models that used to fail: a network wholly inside an If
(Silero VAD), one weight shared by many GEMMs (an unrolled LSTM: one copy of its checksums), and a
model that computes in float16 (a default tolerance in float16 ulps)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models import run_cli
from onnxft.campaigns.equivalence import TOLERANCE_ULPS, compute_format, default_tolerance
from onnxft.passes.share_constants import share_constants

RNG = np.random.default_rng(5)


def save_with_data(model, tmp_path, name, feeds):
    onnx.save(model, str(tmp_path / f"{name}.onnx"))
    np.savez(tmp_path / f"{name}.npz", **feeds)
    return str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.npz")


def network_in_an_if():
    """Everything inside If(sr == 16000), as Silero VAD exports it: Conv 1->8 (k 5) + Relu, then a
    MatMul 8*12 -> 6 in the then branch; a different Conv in the else branch."""
    cw = (RNG.standard_normal((8, 1, 5)) * 0.3).astype(np.float32)
    cw2 = (RNG.standard_normal((8, 1, 5)) * 0.3).astype(np.float32)
    w = (RNG.standard_normal((96, 6)) * 0.2).astype(np.float32)
    def branch(name, conv_w):
        return h.make_graph([h.make_node("Conv", ["x", conv_w], [f"{name}_c"], name=f"{name}_conv"),
                             h.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"),
                             h.make_node("Flatten", [f"{name}_r"], [f"{name}_f"], name=f"{name}_flat"),
                             h.make_node("MatMul", [f"{name}_f", "w"], [f"{name}_y"], name=f"{name}_mm")],
                            name, [], [h.make_tensor_value_info(f"{name}_y", T.FLOAT, ["n", 6])])
    g = h.make_graph([h.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
                      h.make_node("If", ["is16"], ["y"], name="If_0", then_branch=branch("then", "cw"),
                                  else_branch=branch("else", "cw2"))],
                     "vad", [h.make_tensor_value_info("x", T.FLOAT, ["n", 1, 16]),
                             h.make_tensor_value_info("sr", T.INT64, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 6])],
                     [nh.from_array(cw, "cw"), nh.from_array(cw2, "cw2"), nh.from_array(w, "w"),
                      nh.from_array(np.array(16000, np.int64), "k16")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 16)], ir_version=8)


def test_network_inside_an_if_is_hardened_and_measured(tmp_path, capsys):
    m = network_in_an_if()
    path, data = save_with_data(m, tmp_path, "vad", {"x": RNG.standard_normal((8, 1, 16)).astype(np.float32),
                                                     "sr": np.array(16000, np.int64)})
    out = tmp_path / "h.onnx"
    code, text, err = run_cli(["harden", path, "--calib", data, "-o", str(out), "--range", "none"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "h.plan.json").read_text())
    assert {(e["graph"], e["name"]) for e in plan["gemms"]} == {("If_0.then_branch", "then_mm"),
                                                                 ("If_0.else_branch", "else_mm")}
    assert {(e["graph"], e["name"]) for e in plan["convs"]} == {("If_0.then_branch", "then_conv"),
                                                                 ("If_0.else_branch", "else_conv")}
    cov = plan["coverage"]
    # the branch taken (sr = 16000): Conv 8 x 12 outputs x 5 = 480 MACs, MatMul 96 x 6 = 576
    assert cov["macs"] == 480 + 576 and cov["by_scheme"]["none"] == 0 and not cov["unprotected"]
    assert {e["name"] for e in cov["protected_not_measured"]} == {"If_0.else_branch/else_conv",
                                                                  "If_0.else_branch/else_mm"}
    assert "100.0% of 1,056 GEMM+Conv MACs per item protected" in text
    assert plan["verification"]["bit_identical"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_shared_weight_checksums_stored_once(tmp_path, capsys):
    """Six GEMMs reading one weight (an unrolled recurrent cell): the hardened file holds no
    weight-sized tensor derived from it (LB's block checksums are summed in the recovery branches)
    and one copy of its row-checksum vectors (``B e``, ``tau |B| e``: 4 KiB each at K = 1024, merged
    by ``share_constants``), and computes what it computed before."""
    k = 1024
    w = (RNG.standard_normal((k, k)) * 0.03).astype(np.float32)
    nodes, prev = [], "x"
    for t in range(6):
        nodes += [h.make_node("Gemm", [prev, "w"], [f"g{t}"], name=f"cell{t}"),
                  h.make_node("Tanh", [f"g{t}"], [f"h{t}"], name=f"tanh{t}")]
        prev = f"h{t}"
    g = h.make_graph(nodes, "rnn", [h.make_tensor_value_info("x", T.FLOAT, ["n", k])],
                     [h.make_tensor_value_info(prev, T.FLOAT, ["n", k])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    path, data = save_with_data(m, tmp_path, "rnn", {"x": RNG.standard_normal((8, k)).astype(np.float32)})
    out = tmp_path / "h.onnx"
    code, _, err = run_cli(["harden", path, "--calib", data, "-o", str(out), "--range", "none", "--block-size", "4"],
                           capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "h.plan.json").read_text())
    assert len(plan["gemms"]) == 6 and plan["shared_constants"]["initializers_merged"] >= 10
    hardened = onnx.load(str(out))
    # a second pass finds nothing left to share
    assert share_constants(hardened).details["copies_removed"] == 0
    from onnxft.graph.edit import walk

    large = [(tuple(t.dims), t.raw_data) for t in hardened.graph.initializer if len(t.raw_data) >= 4096]
    large += [(tuple(n.attribute[0].t.dims), n.attribute[0].t.raw_data) for _, n in walk(hardened.graph)
              if n.op_type == "Constant" and len(n.attribute[0].t.raw_data) >= 4096]
    assert len(large) == len(set(large))
    assert sorted(d for d, _ in large) == [(k,), (k,), (k, k)]  # the weight, its two row-checksum vectors


def test_share_constants_is_pure_and_keeps_values():
    big = RNG.standard_normal((32, 64)).astype(np.float32)
    then = h.make_graph([h.make_node("Constant", [], ["k1"], value=nh.from_array(big, "v1")),
                         h.make_node("Add", ["x", "k1"], ["t"])], "then", [],
                        [h.make_tensor_value_info("t", T.FLOAT, [32, 64])])
    other = h.make_graph([h.make_node("Constant", [], ["k2"], value=nh.from_array(big, "v2")),
                          h.make_node("Sub", ["x", "k2"], ["e"])], "else", [],
                         [h.make_tensor_value_info("e", T.FLOAT, [32, 64])])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [32, 64]), h.make_tensor_value_info("c", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [32, 64])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    before = m.SerializeToString()
    r = share_constants(m)
    assert m.SerializeToString() == before
    assert r.details["copies_removed"] == 1 and len(r.model.graph.initializer) == 1
    onnx.checker.check_model(r.model, full_check=True)
    import onnxruntime as ort

    x = RNG.standard_normal((32, 64)).astype(np.float32)
    for c in (True, False):
        got = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "c": np.array(c)})[0]
        np.testing.assert_array_equal(got, x + big if c else x - big)


def fp16_model():
    """float32 in and out, float16 inside (onnxruntime's float16 converter's layout)."""
    w = (RNG.standard_normal((32, 32)) * 0.2).astype(np.float16)
    g = h.make_graph([h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16, name="in_cast"),
                      h.make_node("MatMul", ["x16", "w"], ["m"], name="mm"),
                      h.make_node("Softmax", ["m"], ["s"], axis=-1, name="softmax"),
                      h.make_node("MatMul", ["s", "w"], ["m2"], name="mm2"),
                      h.make_node("Cast", ["m2"], ["y"], to=T.FLOAT, name="out_cast")],
                     "fp16", [h.make_tensor_value_info("x", T.FLOAT, ["n", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 32])], [nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_default_tolerance_in_the_models_precision():
    assert compute_format(fp16_model()) == T.FLOAT16
    tol, why = default_tolerance(fp16_model())
    assert tol == TOLERANCE_ULPS * 2.0 ** -10 and "float16" in why
    tol32, why32 = default_tolerance(network_in_an_if())
    assert tol32 == 1e-5 and "float32" in why32


def test_plain_harden_of_an_fp16_model_states_its_tolerance(tmp_path, capsys):
    path, data = save_with_data(fp16_model(), tmp_path, "m16",
                                {"x": (RNG.standard_normal((16, 32)) * 3).astype(np.float32)})
    out = tmp_path / "h.onnx"
    code, text, err = run_cli(["harden", path, "--calib", data, "-o", str(out)], capsys)
    assert code == 0, err
    v = json.loads((tmp_path / "h.plan.json").read_text())["verification"]
    assert v["tolerance"] == pytest.approx(4 * 2.0 ** -10) and "float16" in v["tolerance_basis"]
    assert "tolerance 0.00391 (4 float16 ulps" in text
    # an explicit --tolerance is the user's: below the difference, refused
    if v["in_range_max_rel_diff"] > 0:
        code, _, err = run_cli(["harden", path, "--calib", data, "-o", str(tmp_path / "x.onnx"), "--tolerance",
                                f"{v['in_range_max_rel_diff'] / 2:g}"], capsys)
        assert code != 0 and "tolerance" in err


def lstm_model(hidden=8, inp=6):
    """x [n, 3, 6] -> Transpose -> LSTM over [seq 3, batch n, 6] -> Y_h [1, n, 8] -> [n, 8], opset 17."""
    w = (RNG.standard_normal((1, 4 * hidden, inp)) * 0.3).astype(np.float32)
    r = (RNG.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    b = (RNG.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    g = h.make_graph([h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="time_major"),
                      h.make_node("LSTM", ["xt", "W", "R", "B"], ["", "yh"], hidden_size=hidden, name="lstm"),
                      h.make_node("Squeeze", ["yh", "zero"], ["y"], name="squeeze")],
                     "rnn", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, inp])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", hidden])],
                     [nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B"),
                      nh.from_array(np.array([0], np.int64), "zero")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_lstm_counted_unprotected_then_protected_with_recurrent(tmp_path, capsys):
    path, data = save_with_data(lstm_model(), tmp_path, "lstm",
                                {"x": RNG.standard_normal((8, 3, 6)).astype(np.float32)})
    # without --recurrent: nothing protectable (an LSTM is not a GEMM node), said in one line
    code, _, err = run_cli(["harden", path, "--calib", data, "-o", str(tmp_path / "a.onnx"), "--range", "none"], capsys)
    assert code != 0 and "nothing to protect" in err
    out = tmp_path / "b.onnx"
    code, text, err = run_cli(["harden", path, "--calib", data, "-o", str(out), "--range", "none", "--recurrent"],
                              capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "b.plan.json").read_text())
    assert plan["opset"]["hardened"] == 18 and plan["recurrent"]["decomposed"]
    # X @ W^T for all steps in the main graph, H @ R^T inside the Loop body: both checked
    assert any(not e.get("graph") for e in plan["gemms"]) and any(e.get("graph") for e in plan["gemms"])
    assert plan["coverage"]["by_scheme"]["none"] == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert plan["verification"]["within_tolerance"]


def test_lstm_in_coverage_is_unprotected_gemm_work():
    from onnxft.campaigns.coverage import coverage, gemm_conv_macs

    macs, nested = gemm_conv_macs(lstm_model(), {"x": np.zeros((2, 3, 6), np.float32)})
    # seq 3 x batch 2 x 4 gates x 8 hidden x (6 + 8), per item
    assert macs == {"lstm": ("LSTM", 3 * 2 * 4 * 8 * 14 / 2)} and nested == []
    cov = coverage(macs, nested, [], [], [])
    assert cov["fraction"]["none"] == 1.0 and "recurrent" in cov["unprotected"][0]["reason"]


def test_conv_transpose_counted_as_unprotected_gemm_work():
    """An upsampling ConvTranspose (no ABFT check yet) is GEMM work: counted, unprotected, with
    its reason. x [2, 4, 5, 5], W [4, 3, 2, 2], stride 2: 4*5*5 inputs x 3*2*2 = 1200 MACs per item."""
    from onnxft.campaigns.coverage import coverage, gemm_conv_macs

    w = RNG.standard_normal((4, 3, 2, 2)).astype(np.float32)
    g = h.make_graph([h.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], name="up")], "up",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, 5, 5])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 3, 10, 10])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    macs, _ = gemm_conv_macs(m, {"x": np.zeros((2, 4, 5, 5), np.float32)})
    assert macs == {"up": ("ConvTranspose", 1200.0)}
    cov = coverage(macs, [], [], [], [])
    assert cov["fraction"]["none"] == 1.0 and "ConvTranspose" in cov["unprotected"][0]["reason"]


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 0, 0]])
def test_conv_transpose_protected_and_recovered(pads):
    """An upsampling ConvTranspose (stride 2, bias, then a per-channel scale) is checked by its
    channel sums and its faulty items recomputed: fault-free outputs equal, a real injected fault
    at the ConvTranspose site recovered, the same fault in the unprotected model visible."""
    import onnxruntime as ort

    from onnxft.faults.sampling import Faults
    from onnxft.passes.abft_nested import abft_nested
    from onnxft.passes.inject import inject
    from onnxft.runtime.session import InjectionSession

    rng = np.random.default_rng(17)  # (its own stream: the outcome must not depend on test order)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    sc = (rng.random((1, 3, 1, 1)) + 0.5).astype(np.float32)
    g = h.make_graph([h.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=pads, name="up"),
                      h.make_node("Mul", ["y", "sc"], ["out"], name="scale")], "up",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, 5, 5])],
                     [h.make_tensor_value_info("out", T.FLOAT, ["n", 3, None, None])],
                     [nh.from_array(w, "w"), nh.from_array(b, "b"), nh.from_array(sc, "sc")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    r = abft_nested(m)
    assert [(c["name"], c["op_type"], c["scheme"]) for c in r.details["convs"]] == [("up", "ConvTranspose", "recompute")]
    onnx.checker.check_model(r.model, full_check=True)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)
    sess = InjectionSession(inject(r.model).model, "cpu", threads=1)
    plain = InjectionSession(inject(m).model, "cpu", threads=1)
    for s_, expect_same in ((sess, True), (plain, False)):
        clean, plans = s_.clean({"x": x})
        i = next(k for k, site in enumerate(s_.table.sites) if site.node == "up")
        f = Faults(np.array([i]), np.array([1]), np.array([7]), np.array([0]), np.array([30]))
        faulty = s_.run({"x": x}, f)[0]
        if expect_same:
            np.testing.assert_allclose(faulty, clean[0], rtol=1e-6, atol=1e-6)
        else:
            assert not np.allclose(faulty, clean[0], rtol=1e-3, atol=1e-3)
