"""Cost of the graph forms of global ABFT's GEMVs on onnxruntime's CPU provider (why
``graph.checksums.weight_row_test`` uses two Einsums and an ``Abs`` rather than MatMul against
``[K, 1]`` / ``[K, 2]`` constants):

    OMP_NUM_THREADS=1 python benchmarks/gemv_forms.py --k 384,1536

``A [8, 197, K]`` (a ViT-S Linear's input at batch 8), one thread, the calling thread's CPU time,
all forms interleaved, medians in microseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper


def session(nodes, inits, outs, k):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", 1, [8, None, k])],
                          [helper.make_tensor_value_info(o, 1, None) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def forms(k: int, rng) -> dict:
    be = rng.standard_normal(k).astype(np.float32)
    abe = np.abs(be)
    w2 = np.stack([be, abe], 1)
    t = numpy_helper.from_array
    n = helper.make_node
    return {
        "Einsum A.be + Abs + Einsum |A|.abe (today)": session(
            [n("Einsum", ["A", "be"], ["r"], equation="...k,k->..."), n("Abs", ["A"], ["aa"]),
             n("Einsum", ["aa", "abe"], ["s"], equation="...k,k->...")], [t(be, "be"), t(abe, "abe")], ["r", "s"], k),
        "MatMul A[K,1] + Abs + MatMul |A|[K,1]": session(
            [n("MatMul", ["A", "be"], ["r"]), n("Abs", ["A"], ["aa"]), n("MatMul", ["aa", "abe"], ["s"])],
            [t(be.reshape(k, 1), "be"), t(abe.reshape(k, 1), "abe")], ["r", "s"], k),
        "two Einsums over A (A >= -c: scale from A)": session(
            [n("Einsum", ["A", "be"], ["r"], equation="...k,k->..."),
             n("Einsum", ["A", "abe"], ["s"], equation="...k,k->...")], [t(be, "be"), t(abe, "abe")], ["r", "s"], k),
        "one Einsum A [K,2]": session([n("Einsum", ["A", "w2"], ["r"], equation="...k,kj->...j")], [t(w2, "w2")],
                                      ["r"], k),
        "one MatMul A [K,2]": session([n("MatMul", ["A", "w2"], ["r"])], [t(w2, "w2")], ["r"], k),
        "Abs alone": session([n("Abs", ["A"], ["aa"])], [], ["aa"], k),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="384,1536")
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for k in (int(v) for v in args.k.split(",")):
        a = rng.standard_normal((8, 197, k)).astype(np.float32)
        sessions = forms(k, rng)
        times = {name: [] for name in sessions}
        order = list(sessions.items())
        for i in range(args.repeats):
            for name, s in (order if i % 2 == 0 else order[::-1]):
                t0 = time.thread_time()
                s.run(None, {"A": a})
                times[name].append(time.thread_time() - t0)
        for name in sessions:
            print(f"K={k:<5} {name:<45} {statistics.median(times[name]) * 1e6:8.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
