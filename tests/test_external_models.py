"""Regressions found by running onnxft on models exported outside the repository
(benchmarks/external_models.py: timm, transformers, tf2onnx, old opsets, >2 GB). Every model here is
a tiny stand-in built with onnx.helper, reproducing the feature of the exporter that broke onnxft."""
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxft.api as ft
from onnxft.passes import inject as inject_pass
from onnxft.passes.decompose import decompose
from onnxft.passes.inject import InjectError, prepare
from onnxft.runtime import model_io
from onnxft.runtime.data import input_specs, synthetic

RNG = np.random.default_rng(0)


def f32(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def run_ort(model_or_path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run([sess.get_outputs()[0].name], feeds)[0]


def conv_bn_gemm(opset=13, ir=7, bn_mode="init", inits_as_inputs=False, batch="N"):
    """x [N,3,6,6] -> Conv -> BatchNorm -> Relu -> Flatten -> Gemm(transB=1) -> y [N,4].

    bn_mode: ``init`` (parameters are initializers), ``identity`` (running mean is
    Identity(bias), as torch exports without constant folding), ``constant`` (parameters and the
    Gemm weight are Constant nodes)."""
    tensors = {"w": f32(4, 3, 3, 3), "s": f32(4), "b": f32(4), "m": f32(4) * 0.1,
               "v": np.abs(f32(4)) + 0.5, "fw": f32(4, 4 * 4 * 4), "fb": f32(4)}
    nodes, inits = [], []
    mean = "m"
    if bn_mode == "identity":
        del tensors["m"]
        mean = "m_id"
        nodes.append(h.make_node("Identity", ["b"], [mean], name="/bn/Identity"))
    for name, arr in tensors.items():
        if bn_mode == "constant" and name in ("s", "b", "m", "v", "fw"):
            nodes.append(h.make_node("Constant", [], [name], name=f"/const/{name}", value=nh.from_array(arr, name)))
        else:
            inits.append(nh.from_array(arr, name))
    nodes += [h.make_node("Conv", ["x", "w"], ["c"], name="/conv/Conv"),
              h.make_node("BatchNormalization", ["c", "s", "b", mean, "v"], ["n"], name="/bn/BatchNormalization"),
              h.make_node("Relu", ["n"], ["r"], name="/relu"),
              h.make_node("Flatten", ["r"], ["f"], name="/flatten"),
              h.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="/fc/Gemm")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [batch, 3, 6, 6])]
    if inits_as_inputs:
        inputs += [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "conv_bn_gemm", inputs, [h.make_tensor_value_info("y", T.FLOAT, [batch, 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def images(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


def decomposed_ops(model):
    return [n.op_type for n in decompose(prepare(model)).model.graph.node]


@pytest.mark.parametrize("bn_mode", ["identity", "constant"])
def test_batchnorm_and_gemm_weights_from_identity_or_constant_nodes(bn_mode):
    # torch without constant folding shares equal initializers through Identity (running_mean =
    # Identity(bias)); other exporters give weights as Constant nodes. Both are constants: BatchNorm
    # must be folded into Mul + Add (it was skipped, leaving it fault-free), and the Gemm weight
    # transposed offline.
    m = conv_bn_gemm(bn_mode=bn_mode)
    res = decompose(prepare(m))
    ops = [n.op_type for n in res.model.graph.node]
    assert "BatchNormalization" not in ops and not res.skipped, res.skipped
    assert "Transpose" not in ops
    x = images(3)
    np.testing.assert_allclose(run_ort(res.model, {"x": x}), run_ort(m, {"x": x}), rtol=1e-4, atol=1e-5)
    info = ft.inspect(m)
    assert info["skipped"] == []
    assert {s["origin"] for s in info["sites"]} >= {"BatchNormalization", "Gemm", "Conv"}


@pytest.mark.parametrize("inits_as_inputs", [True, False])
def test_ir3_model_converts_and_keeps_initializers_constant(inits_as_inputs):
    # IR 3 (opset <= 8 era): initializers must be listed as graph inputs. The version converter
    # failed ("Input w is undefined!") when they were not (onnxruntime runs such models), and when
    # they were, later IRs read them as overridable inputs so BatchNorm could not be folded.
    m = conv_bn_gemm(opset=8, ir=3, inits_as_inputs=inits_as_inputs)
    p = prepare(m)
    assert {i.name for i in p.graph.input} == {"x"}
    assert "BatchNormalization" not in decomposed_ops(m)
    x = images(4)
    r = ft.evaluate(m, ft.Dataset({"x": x}, None), bers=[0.0, 1e-3], trials=1, metric="sdc", provider="cpu")
    assert r.points[0].value == 0.0 and r.points[1].faults_per_item > 0


def test_static_batch_model(tmp_path):
    # A static-batch export (batch 2) takes only batches of exactly 2 items: inspect's synthetic
    # batch, eval's --batch and a data size that is not a multiple all failed in onnxruntime.
    m = conv_bn_gemm(batch=2)
    onnx.save(m, tmp_path / "static.onnx")
    np.savez(tmp_path / "d.npz", x=images(5))
    info = ft.inspect(tmp_path / "static.onnx")
    assert info["totals"]["sites"] > 0
    r = ft.evaluate(tmp_path / "static.onnx", tmp_path / "d.npz", bers=[0.0, 1e-3], trials=1, metric="sdc",
                    provider="cpu", batch=64)
    assert r.batch == 2 and r.items == 4
    assert r.points[0].value == 0.0
    out = ft.inject(tmp_path / "static.onnx", tmp_path / "static.inject.onnx", ber=1e-3, batch=8)
    assert out["batch"] == 2
    np.savez(tmp_path / "one.npz", x=images(1))
    with pytest.raises(ValueError, match="exactly 2"):
        ft.evaluate(tmp_path / "static.onnx", tmp_path / "one.npz", bers=[0.0], trials=1, metric="sdc")


def bert_like():
    """int64 input_ids / token_type_ids (type vocabulary of 2) and an int64 attention mask."""
    inits = [nh.from_array(f32(100, 8), "wte"), nh.from_array(f32(2, 8), "tte"), nh.from_array(f32(8, 3), "wc"),
             nh.from_array(np.array([1], np.int64), "ax1")]
    nodes = [h.make_node("Gather", ["wte", "input_ids"], ["e1"]),
             h.make_node("Gather", ["tte", "token_type_ids"], ["e2"]),
             h.make_node("Add", ["e1", "e2"], ["e"]),
             h.make_node("Cast", ["attention_mask"], ["mf"], to=T.FLOAT),
             h.make_node("Unsqueeze", ["mf", "ax1"], ["mu"]),
             h.make_node("Transpose", ["mu"], ["mt"], perm=[0, 2, 1]),
             h.make_node("Mul", ["e", "mt"], ["em"]),
             h.make_node("ReduceSum", ["em", "ax1"], ["pooled"], keepdims=0),
             h.make_node("MatMul", ["pooled", "wc"], ["logits"])]
    ins = [h.make_tensor_value_info(n, T.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    g = h.make_graph(nodes, "bert_like", ins, [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 3])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def test_int64_token_inputs(tmp_path):
    m = bert_like()
    feeds = synthetic(input_specs(m), 2)
    assert not feeds["token_type_ids"].any() and feeds["attention_mask"].all()
    info = ft.inspect(m)  # ran the graph on synthetic ids: token types 0..99 indexed out of range
    assert info["totals"]["sites"] == 4
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", input_ids=rng.integers(0, 100, (6, 5)).astype(np.int32),
             attention_mask=np.ones((6, 5), np.int64), token_type_ids=np.zeros((6, 5), np.int64))
    onnx.save(m, tmp_path / "b.onnx")
    r = ft.evaluate(tmp_path / "b.onnx", tmp_path / "t.npz", bers=[0.0, 1e-2], trials=1, metric="sdc", provider="cpu")
    assert r.points[0].value == 0.0 and r.points[1].faults_per_item > 0


def matmul_chain(tmp_path, name="ext.onnx"):
    """Three 32x32 MatMuls and a Gemm(transB=1) whose weights are in an external data file."""
    inits = [nh.from_array(f32(32, 32, scale=0.2), f"w{i}") for i in range(3)]
    inits.append(nh.from_array(f32(5, 32, scale=0.2), "wh"))
    nodes = [h.make_node("MatMul", ["x", "w0"], ["h0"]), h.make_node("MatMul", ["h0", "w1"], ["h1"]),
             h.make_node("MatMul", ["h1", "w2"], ["h2"]), h.make_node("Gemm", ["h2", "wh"], ["y"], transB=1)]
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 5])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 10
    path = tmp_path / name
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    return m, path


def test_model_over_2gb_keeps_weights_on_disk(tmp_path, monkeypatch):
    # Stand-in for a model over 2 GB: with the limit lowered, load_model keeps the weights
    # external; the version converter, shape inference, the passes, sessions, saving and the checker
    # must all work on the small proto (they cannot serialize more than 2 GB).
    monkeypatch.setattr(model_io, "_TWO_GB", 1000)
    src = tmp_path / "src"
    src.mkdir()
    m, path = matmul_chain(src)
    loaded = model_io.load_model(path)
    assert model_io.external_data_dir(loaded) == str(src.resolve())
    assert all(t.data_location == T.EXTERNAL for t in loaded.graph.initializer)
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)

    assert ft.inspect(path)["totals"]["sites"] == 4
    out = tmp_path / "elsewhere" / "inj.onnx"
    out.parent.mkdir()
    ft.inject(path, out)  # also runs the full checker on the saved file
    assert (out.parent / "inj.onnx.data").is_file()
    saved = onnx.load(out, load_external_data=False)
    assert model_io.external_data_dir(saved) is None
    assert "Transpose" not in {n.op_type for n in saved.graph.node}  # small external weight read
    np.testing.assert_allclose(run_ort(out, {"x": x}), run_ort(onnx.load(path), {"x": x}), rtol=1e-5, atol=1e-6)
    assert stat.S_IMODE(os.stat(out).st_mode) == model_io.file_mode()

    beside = src / "inj.onnx"  # beside the source: its data file is reused, nothing copied
    ft.inject(path, beside)
    assert not (src / "inj.onnx.data").exists()
    np.testing.assert_allclose(run_ort(beside, {"x": x}), run_ort(out, {"x": x}), rtol=0, atol=0)

    r = ft.evaluate(path, tmp_path / "x.npz", bers=[0.0, 1e-3], trials=1, metric="sdc", provider="cpu")
    assert r.points[0].value == 0.0 and r.points[1].faults_per_item > 0


def test_in_memory_model_over_2gb_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(inject_pass, "_TWO_GB", 1000)
    with pytest.raises(InjectError, match="over 2 GB"):
        prepare(conv_bn_gemm())
