"""Tiny models built inline for tests: a one-block transformer classifier and a small CNN."""
from __future__ import annotations

import signal

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def tiny_transformer(seed: int = 0, tokens: int = 6, dim: int = 8, classes: int = 4, opset: int = 17) -> onnx.ModelProto:
    """x [B, tokens, dim] -> LayerNorm -> self-attention (1 head) -> residual -> GELU MLP -> mean -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.5):
        return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [w("ln_s", dim), w("ln_b", dim), w("wq", dim, dim), w("wk", dim, dim), w("wv", dim, dim),
             w("w1", dim, 2 * dim), w("b1", 2 * dim), w("w2", 2 * dim, dim), w("wh", classes, dim), w("bh", classes),
             nh.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"),
             nh.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
             nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(0.5, np.float32), "half"),
             nh.from_array(np.array([1], np.int64), "axis1")]
    n = [
        h.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], axis=-1, name="/blocks.0/norm1/LayerNormalization"),
        h.make_node("MatMul", ["ln", "wq"], ["q"], name="/blocks.0/attn/q/MatMul"),
        h.make_node("MatMul", ["ln", "wk"], ["k"], name="/blocks.0/attn/k/MatMul"),
        h.make_node("MatMul", ["ln", "wv"], ["v"], name="/blocks.0/attn/v/MatMul"),
        h.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="/blocks.0/attn/Transpose"),
        h.make_node("MatMul", ["q", "kt"], ["qk"], name="/blocks.0/attn/MatMul"),
        h.make_node("Mul", ["qk", "scale"], ["qks"], name="/blocks.0/attn/Mul"),
        h.make_node("Softmax", ["qks"], ["att"], axis=-1, name="/blocks.0/attn/Softmax"),
        h.make_node("MatMul", ["att", "v"], ["av"], name="/blocks.0/attn/MatMul_1"),
        h.make_node("Add", ["x", "av"], ["r1"], name="/blocks.0/Add"),
        h.make_node("MatMul", ["r1", "w1"], ["h1"], name="/blocks.0/mlp/fc1/MatMul"),
        h.make_node("Add", ["h1", "b1"], ["h1b"], name="/blocks.0/mlp/fc1/Add"),
        h.make_node("Div", ["h1b", "sqrt2"], ["g0"], name="/blocks.0/mlp/act/Div"),
        h.make_node("Erf", ["g0"], ["g1"], name="/blocks.0/mlp/act/Erf"),
        h.make_node("Add", ["g1", "one"], ["g2"], name="/blocks.0/mlp/act/Add"),
        h.make_node("Mul", ["h1b", "g2"], ["g3"], name="/blocks.0/mlp/act/Mul"),
        h.make_node("Mul", ["g3", "half"], ["g4"], name="/blocks.0/mlp/act/Mul_1"),
        h.make_node("MatMul", ["g4", "w2"], ["h2"], name="/blocks.0/mlp/fc2/MatMul"),
        h.make_node("Add", ["r1", "h2"], ["r2"], name="/blocks.0/Add_1"),
        h.make_node("ReduceMean", ["r2", "axis1"] if opset >= 18 else ["r2"], ["pooled"], keepdims=0,
                    name="/pool/ReduceMean", **({} if opset >= 18 else {"axes": [1]})),
        h.make_node("Gemm", ["pooled", "wh", "bh"], ["logits"], transB=1, name="/head/Gemm"),
    ]
    if opset < 18:
        inits = [i for i in inits if i.name != "axis1"]
    g = h.make_graph(n, "tiny_transformer", [h.make_tensor_value_info("x", T.FLOAT, ["batch", tokens, dim])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["batch", classes])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def tiny_cnn(seed: int = 0, classes: int = 3, opset: int = 13) -> onnx.ModelProto:
    """x [B, 1, 8, 8] -> Conv(pad 1) -> BatchNorm -> Relu -> Conv(stride 2) -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = [nh.from_array(f(4, 1, 3, 3), "c1w"), nh.from_array(f(4), "c1b"),
             nh.from_array(np.abs(f(4)) + 0.5, "bn_s"), nh.from_array(f(4), "bn_b"),
             nh.from_array(f(4) * 0.1, "bn_m"), nh.from_array(np.abs(f(4)) + 0.5, "bn_v"),
             nh.from_array(f(6, 4, 3, 3), "c2w"), nh.from_array(f(6), "c2b"),
             nh.from_array(f(classes, 6), "fw"), nh.from_array(f(classes), "fb")]
    n = [h.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1], name="/layer1/conv/Conv"),
         h.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="/layer1/bn/BatchNormalization"),
         h.make_node("Relu", ["bn"], ["r1"], name="/layer1/relu/Relu"),
         h.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="/layer2/conv/Conv"),
         h.make_node("Relu", ["c2"], ["r2"], name="/layer2/relu/Relu"),
         h.make_node("GlobalAveragePool", ["r2"], ["gap"], name="/pool/GlobalAveragePool"),
         h.make_node("Flatten", ["gap"], ["flat"], name="/Flatten"),
         h.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1, name="/fc/Gemm")]
    g = h.make_graph(n, "tiny_cnn", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 1, 8, 8])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["batch", classes])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def labelled_data(model: onnx.ModelProto, n: int = 32, seed: int = 1):
    """Random inputs labelled by the model's own fault-free predictions (clean top-1 = 1.0)."""
    import onnxruntime as ort

    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = n
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = np.argmax(sess.run(None, {"x": x})[0], axis=1)
    return x, y


def run_cli(argv, capsys):
    """Run ``onnxft ARGV`` in-process: (exit status, stdout, stderr)."""
    import pytest

    from onnxft.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


_STOCK_ORT = """
import sys
# no onnxft in this process, however it is installed (editable or not): refuse the import
class NoOnnxft:
    def find_spec(self, name, path=None, target=None):
        if name == 'onnxft' or name.startswith('onnxft.'):
            raise ImportError('onnxft is blocked in this process')
sys.meta_path.insert(0, NoOnnxft())
try:
    import onnxft
    raise SystemExit('onnxft importable')
except ImportError:
    pass
import numpy as np, onnxruntime as ort
model, feeds, out, level = sys.argv[1:5]
so = ort.SessionOptions()
so.graph_optimization_level = {'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                               'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                               'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
s = ort.InferenceSession(model, so, providers=['CPUExecutionProvider'])
np.save(out, s.run(None, dict(np.load(feeds)))[0])
"""


def run_on_stock_onnxruntime(model: onnx.ModelProto, feeds: dict, tmp_path, level: str = "all") -> np.ndarray:
    """The first output of ``model`` on ``feeds``, computed in a fresh interpreter (``-I``) in which
    onnxft cannot be imported: what a server without onnxft gets from a hardened graph."""
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex[:8]
    path, inp, out = (tmp_path / f"stock_{tag}{ext}" for ext in (".onnx", "_in.npz", "_out.npy"))
    onnx.save(model, str(path))
    np.savez(inp, **feeds)
    subprocess.run([sys.executable, "-I", "-c", _STOCK_ORT, str(path), str(inp), str(out), level], check=True,
                   cwd=str(tmp_path))
    return np.load(out)


def default_sigint():
    """In the child: Ctrl-C's default disposition. A shell without job control starts background
    commands with SIGINT ignored, which their children inherit and Python then keeps ignoring, so a
    CI run started with `&` would not see the signal at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def perturbed(hardened: onnx.ModelProto, unit="g000", elem_type: int = T.FLOAT) -> onnx.ModelProto:
    """The hardened model with ``delta`` (a graph input of ``elem_type``) added to ABFT unit
    ``unit``'s output (``"g000"``, ``"c001"``, or an int for GEMM ``g{unit:03d}``) before its
    checksum test sees it: a faulty GEMM/Conv result, whatever the fault was."""
    if isinstance(unit, int):
        unit = f"g{unit:03d}"
    m = onnx.ModelProto()
    m.CopyFrom(hardened)
    raw = f"onnxft.abft.{unit}/unchecked"
    producer = next(n for n in m.graph.node if raw in n.output)
    producer.output[list(producer.output).index(raw)] = raw + "/clean"
    m.graph.node.insert(list(m.graph.node).index(producer) + 1,
                        h.make_node("Add", [raw + "/clean", "delta"], [raw], name="test/perturb"))
    m.graph.input.append(h.make_tensor_value_info("delta", elem_type, None))
    return m
