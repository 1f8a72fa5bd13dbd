"""harden's own checks: held-out equivalence (split, refusal, --force), opset raised by the minimum
(--keep-opset refuses), no copied weights (file size), and coverage in MACs computed by hand."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models import labelled_data, perturbed, run_cli, tiny_cnn, tiny_transformer
from onnxft.campaigns.coverage import stored
from onnxft.campaigns.equivalence import split_holdout
from onnxft.runtime.data import Dataset


def test_holdout_split_is_disjoint_and_documented_sizes():
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    cal, hold = split_holdout(Dataset({"x": x}, None))
    assert len(cal) == 75 and len(hold) == 25
    assert not set(cal.inputs["x"].ravel()) & set(hold.inputs["x"].ravel())
    cal, hold = split_holdout(Dataset({"x": x}, None), batch=8)  # whole batches of a fixed-batch model
    assert len(hold) == 24 and len(cal) == 76
    big = Dataset({"x": np.zeros((4000, 1), np.float32)}, None)
    assert len(split_holdout(big)[1]) == 256
    assert split_holdout(Dataset({"x": x[:1]}, None))[1] is None


def test_equivalence_uses_held_out_items_only(tmp_path, capsys):
    """The held-out items are the ones the check runs: an item far outside what calibration saw,
    placed in the held-out tail, is reported as leaving the calibrated ranges."""
    m = tiny_transformer(seed=4)
    onnx.save(m, tmp_path / "tf.onnx")
    x, y = labelled_data(m, 64)
    x[-1] *= 50  # only in the held-out quarter
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, out, err = run_cli(["harden", str(tmp_path / "tf.onnx"), "--calib", str(tmp_path / "d.npz"),
                              "-o", str(tmp_path / "h.onnx"), "--precision", "fp32"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "h.plan.json").read_text())
    assert plan["calibration"]["items"] == 48 and plan["calibration"]["held_out_for_equivalence"] == 16
    v = plan["verification"]
    assert v["items"] == 16 and v["level"] == "all" and v["data"] == "held-out calibration items"
    assert v["out_of_range"] >= 1 and v["in_range_max_rel_diff"] <= 1e-5
    assert "held-out calibration items (onnxruntime level all)" in out and "items outside the calibrated ranges" in out
    assert f"inside the calibrated ranges ({16 - v['out_of_range']} items)" in out
    assert plan["precision"] == "fp32"


def residual_cnn(c=16):
    """stem Conv -> Relu -> Conv -> Relu -> Conv -> Add(stem) -> Relu, 16 channels: at level 'all'
    onnxruntime's CPU layout transformer (NCHWc) picks other Conv kernels once a check reads a
    Conv's output, and the hardened outputs move by an ulp or so."""
    rng = np.random.default_rng(0)
    f = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    g = h.make_graph([h.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
                      h.make_node("Relu", ["c0"], ["r0"], name="r0"),
                      h.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                      h.make_node("Relu", ["c1"], ["r1"], name="r1"),
                      h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                      h.make_node("Add", ["c2", "r0"], ["a"], name="add"),
                      h.make_node("Relu", ["a"], ["y"], name="r2")], "res",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", c, 8, 8])],
                     [nh.from_array(f(c, 3, 3, 3), "w0"), nh.from_array(f(c), "b0"), nh.from_array(f(c, c, 3, 3), "w1"),
                      nh.from_array(f(c), "b1"), nh.from_array(f(c, c, 3, 3), "w2"), nh.from_array(f(c), "b2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_out_of_tolerance_is_refused_and_force_writes(tmp_path, capsys):
    m = residual_cnn()
    onnx.save(m, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "h.onnx"
    args = ["harden", str(tmp_path / "cnn.onnx"), "--calib", str(tmp_path / "d.npz"), "-o", str(out),
            "--range", "none", "--tolerance", "0"]
    code, _, err = run_cli(args, capsys)
    assert code != 0 and err.count("\n") == 1 and "onnxft: error: the hardened model differs" in err
    assert "--force" in err and not out.exists() and not (tmp_path / "h.plan.json").exists()
    code, text, err = run_cli(args + ["--force"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "h.plan.json").read_text())
    assert plan["verification"]["forced"] and not plan["verification"]["within_tolerance"]
    assert 0 < plan["verification"]["max_rel_diff"] < 1e-5 and "FORCED" in text
    code, _, err = run_cli(args[:-2] + ["-o", str(tmp_path / "ok.onnx")], capsys)  # default tolerance 1e-5
    assert code == 0, err


def test_conv_batchnorm_stays_fusable():
    """Conv -> BatchNormalization -> Relu: the BatchNorm joins the Conv's unit (the check reads its
    output), so onnxruntime still fuses Conv+BN and the hardened outputs are bit-identical at every
    level; the residual Add of a ResNet block joins its second Conv's unit the same way."""
    from onnxft.campaigns.equivalence import check_equivalence
    from onnxft.passes.abft import abft

    m = tiny_cnn()
    x, _ = labelled_data(m, 16)
    r = abft(m)
    assert r.details["convs"][0]["absorbed"] == ["/layer1/bn/BatchNormalization"]
    for level in ("disabled", "basic", "extended", "all"):
        assert check_equivalence(m, r.model, Dataset({"x": x}, None), level=level)["bit_identical"], level
    res = abft(residual_cnn())
    assert [c["absorbed"] for c in res.details["convs"]] == [[], [], ["add"]]
    xr = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype(np.float32)
    for level in ("disabled", "basic", "extended"):
        assert check_equivalence(residual_cnn(), res.model, Dataset({"x": xr}, None), level=level)["bit_identical"]


def opset9_model():
    rng = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["p"], name="fc"), h.make_node("Add", ["p", "b"], ["q"], name="fc_b"),
                      h.make_node("Relu", ["q"], ["r"], name="relu"),
                      h.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="head", transB=1),
                      h.make_node("Softmax", ["y"], ["prob"], axis=1, name="sm")],
                     "op9", [h.make_tensor_value_info("x", T.FLOAT, ["n", 16])],
                     [h.make_tensor_value_info("prob", T.FLOAT, ["n", 5])],
                     [nh.from_array(rng.standard_normal((16, 12)).astype(np.float32), "W"),
                      nh.from_array(rng.standard_normal(12).astype(np.float32), "b"),
                      nh.from_array(rng.standard_normal((5, 12)).astype(np.float32), "W2"),
                      nh.from_array(rng.standard_normal(5).astype(np.float32), "b2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 9)], ir_version=4)


def test_opset9_is_raised_to_13_and_protected(tmp_path, capsys):
    onnx.save(opset9_model(), tmp_path / "m9.onnx")
    out = tmp_path / "h.onnx"
    code, text, err = run_cli(["harden", str(tmp_path / "m9.onnx"), "-o", str(out)], capsys)
    assert code == 0, err
    assert "opset raised from 9 to 13" in text
    plan = json.loads((tmp_path / "h.plan.json").read_text())
    assert plan["opset"]["original"] == 9 and plan["opset"]["hardened"] == 13 and plan["opset"]["raised"]
    assert plan["opset"]["verification"]["max_abs_diff"] == 0
    hardened = onnx.load(str(out))
    assert next(o.version for o in hardened.opset_import if o.domain in ("", "ai.onnx")) == 13
    onnx.checker.check_model(hardened, full_check=True)
    assert len(plan["gemms"]) == 2 and plan["coverage"]["fraction"]["none"] == 0


def test_keep_opset_refuses(tmp_path, capsys):
    onnx.save(opset9_model(), tmp_path / "m9.onnx")
    out = tmp_path / "h.onnx"
    code, _, err = run_cli(["harden", str(tmp_path / "m9.onnx"), "-o", str(out), "--keep-opset"], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "opset is 9; ABFT needs opset 13" in err and "--keep-opset" in err and not out.exists()


def big_weights_model():
    """Conv 64->64 3x3 (weight + bias), a Gemm with transB and alpha (the layout that used to be
    copied), and a MatMul + bias: 2.3 MB of weights."""
    rng = np.random.default_rng(1)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    g = h.make_graph([h.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                      h.make_node("Relu", ["c"], ["r"], name="relu"),
                      h.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                      h.make_node("Flatten", ["p"], ["fl"], name="flat"),
                      h.make_node("MatMul", ["fl", "w1"], ["m"], name="fc1"),
                      h.make_node("Add", ["m", "b1"], ["mb"], name="fc1_b"),
                      h.make_node("Gemm", ["mb", "w2", "b2"], ["y"], name="fc2", transB=1, alpha=0.5)],
                     "big", [h.make_tensor_value_info("x", T.FLOAT, ["n", 64, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 512])],
                     [nh.from_array(f(64, 64, 3, 3), "cw"), nh.from_array(f(64), "cb"),
                      nh.from_array(f(64, 512), "w1"), nh.from_array(f(512), "b1"),
                      nh.from_array(f(512, 512), "w2"), nh.from_array(f(512), "b2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _checksum_bytes(hardened: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Bytes of the tensors harden added: main-graph initializers and the Constants of If branches."""
    have = {t.name for t in original.graph.initializer}
    total = sum(len(t.SerializeToString()) for t in hardened.graph.initializer if t.name not in have)
    for n in hardened.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                total += sum(len(c.SerializeToString()) for c in a.g.node if c.op_type == "Constant")
    return total


@pytest.mark.parametrize("scheme", ["lb", "standard"])
def test_hardened_file_holds_no_copied_weights(tmp_path, capsys, scheme):
    m = big_weights_model()
    onnx.save(m, tmp_path / "big.onnx")
    out = tmp_path / f"h_{scheme}.onnx"
    code, _, err = run_cli(["harden", str(tmp_path / "big.onnx"), "-o", str(out), "--abft", scheme,
                            "--range", "none"], capsys)
    assert code == 0, err
    hardened = onnx.load(str(out))
    size, orig = out.stat().st_size, (tmp_path / "big.onnx").stat().st_size
    extra = _checksum_bytes(hardened, m)
    assert size <= 1.05 * orig + extra, (size, orig, extra)
    assert extra < 0.2 * orig  # checksums, not weights
    plan = json.loads((tmp_path / f"h_{scheme}.plan.json").read_text())
    assert len(plan["gemms"]) == 2 and len(plan["convs"]) == 1


def test_coverage_by_hand(tmp_path, capsys):
    """Conv 3->4 3x3 on 8x8 (pads 1): 4*8*8 outputs x 27 = 6912 MACs per item; Gemm 256->10:
    2560; a matrix-vector MatMul (10 MACs) that ABFT skips. Total 9482."""
    rng = np.random.default_rng(2)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    g = h.make_graph([h.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                      h.make_node("Flatten", ["c"], ["fl"], name="flat"),
                      h.make_node("Gemm", ["fl", "gw"], ["y"], name="head", transB=1),
                      h.make_node("MatMul", ["y", "v"], ["s"], name="score")],
                     "cov", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 8, 8])],
                     [h.make_tensor_value_info("s", T.FLOAT, ["n"])],
                     [nh.from_array(f(4, 3, 3, 3), "cw"), nh.from_array(f(10, 256), "gw"), nh.from_array(f(10), "v")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "cov.onnx")
    out = tmp_path / "h.onnx"
    code, text, err = run_cli(["harden", str(tmp_path / "cov.onnx"), "-o", str(out), "--range", "none"], capsys)
    assert code == 0, err
    cov = json.loads((tmp_path / "h.plan.json").read_text())["coverage"]
    assert cov["macs"] == 9482
    assert cov["by_scheme"]["recompute"] == 6912 and cov["by_scheme"]["lb"] == 2560 and cov["by_scheme"]["none"] == 10
    assert [u["name"] for u in cov["unprotected"]] == ["score"] and "vector" in cov["unprotected"][0]["reason"]
    line = next(s for s in text.splitlines() if s.startswith("coverage:"))
    assert "99.9% of 9,482 GEMM+Conv MACs per item protected" in line
    assert stored(onnx.load(str(out))) == cov
    code, text, err = run_cli(["inspect", str(out)], capsys)
    assert code == 0, err
    assert "hardened by onnxft: " + line in text and "unprotected MatMul score" in text


def test_precision_option(tmp_path, capsys):
    onnx.save(opset9_model(), tmp_path / "m9.onnx")
    code, _, err = run_cli(["harden", str(tmp_path / "m9.onnx"), "--precision", "fp64"], capsys)
    assert code != 0 and "fp64" in err
    code, _, err = run_cli(["harden", str(tmp_path / "m9.onnx"), "-o", str(tmp_path / "b.onnx"),
                            "--precision", "bf16"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "b.plan.json").read_text())
    assert plan["precision"] == "bf16" and all(g["tau"] > 2.0**-8 for g in plan["gemms"])


@pytest.mark.parametrize("which", ["bn", "residual"])
def test_absorbed_chain_is_checked_and_recovered(which):
    """A corrupted result at the end of an absorbed chain (Conv + BN, Conv + residual Add) is
    detected and the flagged items are recomputed through the chain: the output equals the clean one."""
    from onnxft.passes.abft import abft

    model = tiny_cnn() if which == "bn" else residual_cnn()
    unit = 0 if which == "bn" else 2
    shape = (3, 4, 8, 8) if which == "bn" else (3, 16, 8, 8)
    x = np.random.default_rng(5).standard_normal((3,) + ((1, 8, 8) if which == "bn" else (3, 8, 8))).astype(np.float32)
    r = abft(model, expose_flags=True)
    m = perturbed(r.model, f"c{unit:03d}")
    import onnxruntime as ort

    def run(mm, feeds):
        s = ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    out_name = model.graph.output[0].name
    clean = run(model, {"x": x})[out_name]
    for value in (1e3, -20.0, np.inf, np.nan):
        delta = np.zeros(shape, np.float32)
        delta[1, 2, 3, 4] = value
        got = run(m, {"x": x, "delta": delta})
        name = "/layer1/conv/Conv" if which == "bn" else "conv2"
        assert bool(got[f"onnxft.abft.{name}.detected"]), value
        np.testing.assert_allclose(got[out_name], clean, rtol=1e-5, atol=1e-5)


def test_range_restriction_alone_keeps_opset9(tmp_path, capsys):
    """Range restriction is written in opset-9 forms: nothing to raise, and no opset line."""
    onnx.save(opset9_model(), tmp_path / "m9.onnx")
    code, text, err = run_cli(["harden", str(tmp_path / "m9.onnx"), "-o", str(tmp_path / "r.onnx"), "--abft", "none"],
                              capsys)
    assert code == 0, err
    assert "opset raised" not in text
    hardened = onnx.load(str(tmp_path / "r.onnx"))
    assert hardened.opset_import[0].version == 9
    onnx.checker.check_model(hardened, full_check=True)
    plan = json.loads((tmp_path / "r.plan.json").read_text())
    assert plan["opset"] == {"original": 9, "hardened": 9, "raised": False} and plan["ranges"]


def test_compare_passes_the_precision_to_its_hardened_variants(tmp_path):
    from onnxft import api

    m = tiny_transformer(seed=4)
    onnx.save(m, tmp_path / "tf.onnx")
    x, y = labelled_data(m, 32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = api.compare(str(tmp_path / "tf.onnx"), ["lb"], [1e-4], str(tmp_path / "d.npz"), trials=1, batch=32,
                      provider="cpu", precision="fp32")
    assert out["precision"] == "fp32"
