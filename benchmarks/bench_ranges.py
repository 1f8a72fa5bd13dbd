"""Fault-free latency overhead of range restriction (Softmax + GELU, clamp and zero modes).

    python benchmarks/bench_ranges.py                          # bundled sample vit, CPU, batch 8
    python benchmarks/bench_ranges.py --models vit,vit-s16 --kinds all --repeats 200 --json /tmp/r.json
    python benchmarks/bench_ranges.py --profile --threads 1   # + onnxruntime kernel time per op type

On a loaded machine the wall-clock medians swing; ``--profile`` adds what onnxruntime's profiler
attributes to each op type per run (clamp model), which isolates the inserted kernels' own cost.

Runs alternate (original, clamp, zero, original, ...) so that machine noise hits all alike; the
figures are medians over ``--repeats`` rounds. Bounds come from the bundled data for samples and
from synthetic batches for the presets of benchmarks/vit_graph.py (random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnxft import samples as ft_samples  # noqa: E402
from onnxft.campaigns.calibrate_ranges import calibrate_ranges, dataset_batches  # noqa: E402
from onnxft.passes.ranges import find_range_sites, restrict_ranges, site_bounds  # noqa: E402
from onnxft.runtime.data import input_specs, load_npz, synthetic  # noqa: E402
from onnxft.runtime.session import make_session, with_static_inputs  # noqa: E402
from vit_graph import PRESETS, build_vit  # noqa: E402


def load(name: str) -> tuple[onnx.ModelProto, list]:
    """The model and its calibration batches."""
    if name in PRESETS:
        m = build_vit(**PRESETS[name])
        return m, [synthetic(input_specs(m), 8, seed) for seed in range(4)]
    path, data = ft_samples.resolve_model(name)
    m = onnx.load(path)
    if data is None:
        return m, [synthetic(input_specs(m), 8, seed) for seed in range(4)]
    return m, list(dataset_batches(load_npz(data, input_specs(m)), 256))


def profile(model: onnx.ModelProto, feeds: dict, threads: int | None, runs: int = 100) -> dict[str, float]:
    """Microseconds per run that onnxruntime's profiler attributes to each op type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "onnxft_bench_ranges")
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    per_op: dict[str, float] = {}
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / runs
    trace.unlink()
    return per_op


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit")
    ap.add_argument("--kinds", default="softmax,gelu", help="comma list of range kinds, or all")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="also print kernel time per op type (clamp model)")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'model':<10} {'sites':>5} {'nodes':>5} {'original ms':>11} {'clamp ms':>9} {'clamp %':>7} "
          f"{'zero ms':>8} {'zero %':>6}")
    for name in args.models.split(","):
        model, calib = load(name)
        sites = find_range_sites(model, kinds=args.kinds.split(","))
        bounds = site_bounds(sites, calibrate_ranges(model, calib, sites.needing_calibration()))
        feeds = synthetic(input_specs(model), args.batch, 0)
        variants = {"original": model}
        for mode in ("clamp", "zero"):
            variants[mode] = restrict_ranges(model, bounds, mode, sites).model
        n_nodes = restrict_ranges(model, bounds, "clamp", sites).details["nodes_inserted"]
        sessions = {k: make_session(with_static_inputs(m, feeds), "cpu", args.threads) for k, m in variants.items()}
        times = {k: [] for k in sessions}
        for r in range(args.repeats + 5):
            order = list(sessions)[r % 3:] + list(sessions)[:r % 3]  # rotate who goes first
            for k in order:
                t0 = time.perf_counter()
                sessions[k].run(None, feeds)
                if r >= 5:  # warm-up rounds are not counted
                    times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v) * 1e3) for k, v in times.items()}
        row = {"model": name, "sites": len(sites), "nodes": n_nodes, "batch": args.batch, "repeats": args.repeats,
               **{f"{k}_ms": v for k, v in med.items()},
               "clamp_overhead": med["clamp"] / med["original"] - 1, "zero_overhead": med["zero"] / med["original"] - 1}
        if args.profile:
            row["clamp_kernel_us"] = profile(variants["clamp"], feeds, args.threads)
            row["original_kernel_us"] = profile(model, feeds, args.threads)
        rows.append(row)
        print(f"{name:<10} {len(sites):>5} {n_nodes:>5} {med['original']:>11.2f} {med['clamp']:>9.2f} "
              f"{100 * row['clamp_overhead']:>6.1f}% {med['zero']:>8.2f} {100 * row['zero_overhead']:>5.1f}%", flush=True)
        if args.profile:
            for k in ("original_kernel_us", "clamp_kernel_us"):
                total = sum(row[k].values())
                top = ", ".join(f"{op} {us:.0f}" for op, us in sorted(row[k].items(), key=lambda kv: -kv[1])[:8])
                print(f"  {k}: total {total:.0f} us per run; {top}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
