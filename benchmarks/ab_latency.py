"""Fault-free latency of several ONNX files side by side in one process, against the first.

    python benchmarks/ab_latency.py ORIGINAL.onnx HARDENED_A.onnx HARDENED_B.onnx --repeats 21

One onnxruntime thread (CPU time of the calling thread), default optimisation level, random inputs
(a dynamic first axis is --batch, other dynamic axes --image), every file run once per round in an
order that alternates between rounds, medians, each ratio to the first file. Use it to compare two
builds of a hardened graph (say, before and after a change: save each with ``onnx.save``) without
the run-to-run spread of separate processes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_harden import feeds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    args = ap.parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in args.models]
    x = feeds(onnx.load(args.models[0], load_external_data=False), args.batch, args.image)
    for s in sessions:
        for _ in range(2):
            s.run(None, x)
    times = [[] for _ in sessions]
    for i in range(args.repeats):
        order = list(enumerate(sessions))
        for k, s in (order if i % 2 == 0 else order[::-1]):
            t = time.thread_time()
            s.run(None, x)
            times[k].append(time.thread_time() - t)
    base = statistics.median(times[0])
    for path, t in zip(args.models, times):
        print(f"{statistics.median(t) * 1e3:10.1f} ms  {statistics.median(t) / base:6.3f}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
