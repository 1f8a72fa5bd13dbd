"""How the two overhead targets depend on model size: LB-ABFT fault-free latency and injection time.

    python benchmarks/size_sweep.py                                  # vit, vit-tiny16, vit-s16, vit-b16
    python benchmarks/size_sweep.py --models vit,vit-tiny16 --repeats 15 --json /tmp/sweep.json

For each model, on one CPU thread, timed with ``time.thread_time`` (the CPU time of this thread, so
that other processes on a shared machine barely move the figures), batch 8:

- ``lb ratio``: the graph that ``onnxft harden MODEL --range none --batch 8`` writes (LB-ABFT on every
  MatMul/Gemm/Conv, detection path only: no faults) against the original with the same static batch,
  both at onnxruntime's default level (all optimizations), runs interleaved;
- ``inject ratio``: one whole faulty trial at BER 1e-8 (sampling, fault tables, injection graph) against
  one clean inference, as ``onnxft bench`` measures it (``bench_cpu_time.cpu_ratios``).

Both costs are mostly fixed per node and per protected or faulted site, while the model's own time
grows with its width and token count; the table shows where each ratio crosses its target (1.10 for
hardening, 1.15 for injection). Models: the bundled sample ``vit`` and the presets of
benchmarks/vit_graph.py (random weights; ViT-Tiny/S/B at 224 px, patch 16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnxft.api as ft  # noqa: E402
from bench_cpu_time import cpu_ratios  # noqa: E402
from bench_injection import resolve  # noqa: E402
from onnxft.campaigns.harden import HardenOptions  # noqa: E402
from onnxft.campaigns.overhead import latency_overhead  # noqa: E402
from onnxft.report.outputs import atomic_write  # noqa: E402
from onnxft.runtime.model_io import load_model  # noqa: E402


def lb_ratio(path: str, hardened: Path, batch: int, repeats: int) -> dict:
    """Fault-free CPU time of the hardened graph over the original's, one thread, interleaved."""
    ft.harden(path, hardened, HardenOptions(range_mode="none", batch=batch), calib=None)
    original, protected = load_model(path), load_model(str(hardened))
    r = latency_overhead(original, protected, batch=batch, provider="cpu", repeats=repeats, warmup=2,
                         threads=1, clock=time.thread_time)
    return {"clean_ms": r["baseline_ms"], "hardened_ms": r["model_ms"], "ratio": r["ratio"],
            "nodes_added": len(protected.graph.node) - len(original.graph.node)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit-tiny16,vit-s16,vit-b16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ber", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    print(f"# one CPU thread, batch {args.batch}, {args.repeats} interleaved repeats, medians of thread CPU time")
    print(f"{'model':<12} {'Gops/item':>9} {'clean ms':>9} {'lb ratio':>9} {'nodes+':>7} "
          f"{'inject ratio @' + format(args.ber, 'g'):>20}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxft-sweep-") as td:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = resolve(name, Path(td))
            if path is None:
                continue
            gops = ft.inspect(path)["totals"]["operations_per_item"] / 1e9  # fault-site operations
            lb = lb_ratio(path, Path(td) / f"{Path(path).stem}.lb.onnx", args.batch, args.repeats)
            inj = cpu_ratios(path, [args.ber], args.batch, args.repeats)
            row = {"model": name, "gops_per_item": gops, "clean_ms": lb["clean_ms"], "lb_ratio": lb["ratio"],
                   "lb_nodes_added": lb["nodes_added"], "inject_clean_ms": inj["clean_ms"],
                   "inject_ratio": inj["ratio"][args.ber], "ber": args.ber, "batch": args.batch}
            rows.append(row)
            print(f"{name:<12} {gops:>9.3f} {lb['clean_ms']:>9.1f} {lb['ratio']:>9.3f} {lb['nodes_added']:>7} "
                  f"{row['inject_ratio']:>20.3f}", flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
