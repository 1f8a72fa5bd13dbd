"""Fault-free latency of ABFT-hardened graphs against the original (detection path only).

    python benchmarks/bench_harden.py                        # sample vit and a ViT-B/16, lb and standard
    python benchmarks/bench_harden.py --models vit --repeats 200 --threads 1

Interleaved runs (original, lb, standard, original, ...) on the same inputs, medians, ratio to the
original. Sessions at onnxruntime's default level (all optimizations), CPU, batch 8 by default.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnxft import samples as ft_samples  # noqa: E402
from onnxft.passes.abft import abft  # noqa: E402
from vit_graph import PRESETS, build_vit  # noqa: E402


def load(name: str) -> onnx.ModelProto:
    if name in PRESETS:
        print(f"# building {name} with random weights ...", file=sys.stderr, flush=True)
        return build_vit(**PRESETS[name])
    s = ft_samples.sample_model(name)
    return onnx.load(s["path"] if s else name)


def feeds(model: onnx.ModelProto, batch: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i in model.graph.input:
        if i.name in {t.name for t in model.graph.initializer}:
            continue
        shape = [batch if not d.dim_value else d.dim_value for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def session(model: onnx.ModelProto, threads: int | None, tmp: Path, tag: str):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    path = tmp / f"{tag}.onnx"  # (ViT-B is over protobuf's comfortable size for in-memory bytes)
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit-b16")
    ap.add_argument("--schemes", default="lb,standard")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ber", type=float, default=1e-8)
    args = ap.parse_args(argv)
    print(f"# onnxruntime {ort.__version__}, CPU, batch {args.batch}, {args.repeats} interleaved repeats, "
          f"threads {args.threads or 'default'}")
    print(f"{'model':<10} {'scheme':<9} {'GEMMs':>5} {'nodes+':>6} {'original ms':>11} {'hardened ms':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.models.split(","):
            model = load(name)
            x = feeds(model, args.batch)
            variants = {"original": session(model, args.threads, tmp, "orig")}
            info = {}
            for scheme in args.schemes.split(","):
                r = abft(model, scheme=scheme, ber=args.ber)
                info[scheme] = (len(r.details["gemms"]), len(r.model.graph.node) - len(model.graph.node))
                variants[scheme] = session(r.model, args.threads, tmp, scheme)
            for s in variants.values():  # warm up
                for _ in range(3):
                    s.run(None, x)
            times = {k: [] for k in variants}
            for _ in range(args.repeats):
                for k, s in variants.items():
                    t = time.perf_counter()
                    s.run(None, x)
                    times[k].append(time.perf_counter() - t)
            base = statistics.median(times["original"])
            for scheme in args.schemes.split(","):
                med = statistics.median(times[scheme])
                g, n = info[scheme]
                print(f"{name:<10} {scheme:<9} {g:>5} {n:>6} {base * 1e3:>11.2f} {med * 1e3:>11.2f} {med / base:>6.3f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
