"""benchmarks/vit_graph.py builds a valid ViT graph that onnxruntime runs at any batch size."""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from vit_graph import build_vit, op_histogram  # noqa: E402


def test_tiny_vit_checks_and_runs():
    m = build_vit(image=32, patch=8, dim=64, depth=2, heads=4, classes=10)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    names = {n.name for n in m.graph.node}
    for want in ("/patch_embed/proj/Conv", "/blocks.1/attn/qkv/MatMul", "/blocks.0/attn/Softmax",
                 "/blocks.1/mlp/fc1/MatMul", "/blocks.0/norm1/LayerNormalization", "/head/MatMul"):
        assert want in names
    hist = op_histogram(m)
    assert hist["LayerNormalization"] == 2 * 2 + 1 and hist["Softmax"] == 2 and hist["Erf"] == 2
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        (y,) = sess.run(["logits"], {"x": x})
        assert y.shape == (batch, 10)
        assert np.isfinite(y).all()
        assert np.abs(y).max() > 0
