"""Checksum builders (onnxft.graph.checksums) run on onnxruntime against numpy, at several opsets."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from onnxft.graph.checksums import (Nodes, any_false, block_indicator, checksum_test, count_true, reduce,
                                    runtime_checksums, weight_checksums)
from onnxft.graph.roles import PROTECTION, role_of


def run(nb: Nodes, inputs: dict, outputs: list[str]):
    ins = [h.make_tensor_value_info(k, T.FLOAT if v.dtype == np.float32 else T.BOOL, list(v.shape))
           for k, v in inputs.items()]

    def model(outs):
        g = h.make_graph(nb.nodes, "g", ins, outs, nb.initializers)
        return h.make_model(g, opset_imports=[h.make_opsetid("", nb.opset)], ir_version=8)

    inferred = onnx.shape_inference.infer_shapes(model([]), strict_mode=True)
    vis = {v.name: v for v in inferred.graph.value_info}
    m = model([vis[o] for o in outputs])
    onnx.checker.check_model(m, full_check=True)
    assert all(role_of(n) == PROTECTION for n in nb.nodes)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(outputs, inputs)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_reduce_forms(opset):
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    nb = Nodes("p", opset)
    outs = [reduce(nb, "ReduceSum", "x", [-1]), reduce(nb, "ReduceL1", "x", [1], keepdims=0),
            reduce(nb, "ReduceMax", "x", None, keepdims=0)]
    s, l1, mx = run(nb, {"x": x}, outs)
    np.testing.assert_allclose(s, x.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(l1, np.abs(x).sum(1), rtol=1e-6)
    assert mx == x.max()


@pytest.mark.parametrize("opset", [13, 18])
def test_runtime_checksums_and_test(opset):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 4, 6)).astype(np.float32)
    b = rng.standard_normal((2, 6, 10)).astype(np.float32)
    y = (a @ b).astype(np.float32)
    y[1, 2, 3] += 1.0
    e = block_indicator(10, 4)
    nb = Nodes("p", opset)
    be, abe = runtime_checksums(nb, "b")
    bbe, babe = runtime_checksums(nb, "b", nb.const(e))
    ok, diff, scale = checksum_test(nb, reduce(nb, "ReduceSum", "y", [-1]), "a", be, abe, nb.const(np.float32(1e-5)))
    okb, _, _ = checksum_test(nb, nb.op("MatMul", "y", nb.const(e)), "a", bbe, babe, nb.const(np.float32(1e-5)))
    anyf = any_false(nb, ok)
    cnt = count_true(nb, nb.op("Not", okb), None)
    r = run(nb, {"a": a, "b": b, "y": y}, [be, abe, ok, diff, scale, okb, anyf, cnt])
    np.testing.assert_allclose(r[0], b.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(r[1], np.abs(b).sum(-1, keepdims=True), rtol=1e-5)
    want_diff = y.sum(-1, keepdims=True) - a @ b.sum(-1, keepdims=True)
    np.testing.assert_allclose(r[3], want_diff, atol=1e-4)
    np.testing.assert_allclose(r[4], 1e-5 * (np.abs(a) @ np.abs(b).sum(-1, keepdims=True)), rtol=1e-5)
    flagged = ~r[2][..., 0]
    assert flagged.sum() == 1 and flagged[1, 2]
    blk = ~r[5]
    assert blk.sum() == 1 and blk[1, 2, 0]  # column 3 is in block 0 of width 4
    assert bool(r[6]) and int(r[7]) == 1


def test_nan_is_flagged_and_weight_checksums():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    be, abe, bs, babs = weight_checksums(w, 1e-4, bias)
    np.testing.assert_allclose(be[:, 0], w.astype(np.float64).sum(1), rtol=1e-6)
    np.testing.assert_allclose(abe[:, 0], 1e-4 * np.abs(w.astype(np.float64)).sum(1), rtol=1e-6)
    y = (a @ w + bias).astype(np.float32)
    y[0, 1] = np.nan
    y[2, 0] = np.inf
    nb = Nodes("p", 17)
    ok, _, _ = checksum_test(nb, reduce(nb, "ReduceSum", "y", [-1]), "a", nb.const(be), nb.const(abe), None,
                             nb.const(bs.reshape(())), nb.const(babs.reshape(())))
    (okv,) = run(nb, {"a": a, "y": y}, [ok])
    assert okv[:, 0].tolist() == [False, True, False]


def test_block_indicator():
    e = block_indicator(10, 4)
    assert e.shape == (10, 3) and e.sum(0).tolist() == [4, 4, 2] and (e.sum(1) == 1).all()


@pytest.mark.parametrize("opset", [13, 21])
def test_weight_row_test(opset):
    from onnxft.graph.checksums import weight_row_test

    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w = rng.standard_normal((8, 6)).astype(np.float64)
    bias = rng.standard_normal(6)
    y = (a @ w.astype(np.float32) + bias.astype(np.float32)).astype(np.float32)
    y[1, 3, 2] = -np.inf
    y[0, 0, 5] += 0.01
    tau = 1e-5
    nb = Nodes("p", opset)
    ok, diff, scale = weight_row_test(nb, "y", "a", w.sum(1), tau * np.abs(w).sum(1), None,
                                      bias.sum(), tau * np.abs(bias).sum())
    okv, d, sc = run(nb, {"a": a, "y": y}, [ok, diff, scale])
    a64 = a.astype(np.float64)
    want_d = y.astype(np.float64).sum(-1) - (a64 @ w.sum(1) + bias.sum())
    finite = np.isfinite(want_d)
    np.testing.assert_allclose(d[finite], want_d[finite], atol=1e-4)
    np.testing.assert_allclose(sc, tau * (np.abs(a64) @ np.abs(w).sum(1) + np.abs(bias).sum()), rtol=1e-5)
    assert (~okv).sum() == 2 and not okv[1, 3] and not okv[0, 0]
