"""Does a GEMM against a widened weight [B | Be | |B|e] (``--abft-impl fused``) round its first N
columns as the original MatMul does, and is the product with the negated weight (``dup``) exactly
-Y? One session per shape on onnxruntime's CPU provider, bit-for-bit comparison.

    python benchmarks/fused_rounding.py                 # 528 shapes, 1 and 2 threads, ~1 minute
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def session(a_shape, b, bias, threads):
    nodes = [h.make_node("MatMul", ["a", "b"], ["y0" if bias is not None else "y"])]
    inits = [nh.from_array(b, "b")]
    if bias is not None:  # (the torch Linear export: onnxruntime may fuse it into one kernel)
        nodes.append(h.make_node("Add", ["y0", "c"], ["y"]))
        inits.append(nh.from_array(bias, "c"))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("a", T.FLOAT, a_shape)],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    tried = fused_bad = dup_bad = 0
    for threads in (int(t) for t in args.threads.split(",")):
        for rank2, m, k, n in itertools.product((False, True), (1, 8, 50), (100, 300, 1000, 2500),
                                                (1, 2, 3, 10, 14, 16, 17, 30, 64, 100, 200)):
            shape = (8 * m, k) if rank2 else (8, m, k)
            a = rng.standard_normal(shape).astype(np.float32)
            b = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            bias = (rng.standard_normal(n) * 0.1).astype(np.float32) if n % 2 else None
            b64 = b.astype(np.float64)
            cols = np.stack([b64.sum(1), np.abs(b64).sum(1)], 1).astype(np.float32)
            wide_bias = None if bias is None else np.concatenate(
                [bias, [bias.sum(dtype=np.float64), np.abs(bias).sum(dtype=np.float64)]]).astype(np.float32)
            y = session(shape, b, bias, threads).run(None, {"a": a})[0]
            z = session(shape, np.concatenate([b, cols], 1), wide_bias, threads).run(None, {"a": a})[0]
            y2 = session(shape, -b, None if bias is None else -bias, threads).run(None, {"a": a})[0]
            tried += 1
            if not np.array_equal(z[..., :n], y):
                fused_bad += 1
                d = np.abs(z[..., :n] - y)
                print(f"fused differs: threads {threads} rank2 {rank2} M {m} K {k} N {n}: "
                      f"{np.mean(d > 0):.3f} of elements, max {d.max() / np.abs(y).max():.2e} of max |Y|")
            if not np.array_equal(y2, -y):
                dup_bad += 1
                print(f"dup differs: threads {threads} rank2 {rank2} M {m} K {k} N {n}")
    print(f"onnxruntime {ort.__version__}: {tried} shapes; fused's first N columns differ from the original "
          f"on {fused_bad}; the negated product differs from -Y on {dup_bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
