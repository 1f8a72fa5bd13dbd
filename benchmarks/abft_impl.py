"""Fault-free latency overhead of each ABFT implementation (``--abft-impl``), per model and batch.

    OMP_NUM_THREADS=1 python benchmarks/abft_impl.py --threads 1 --clock cpu
    python benchmarks/abft_impl.py --models vit,resnet --batches 1,8 --repeats 15 --threads 1

For every (model, batch): the original and the LB-ABFT graphs built with ``global``, ``fused``,
``dup``, ``ig`` (seed 004's rule: AI at this batch against the ridge point, with onnxft's fused
refinements), ``ig0`` (ig without ``FUSED_MIN_A_BYTES``: the byte rule alone) and ``ig --autotune``
(candidates profiled per GEMM on this machine), all with static shapes (as ``harden --batch``),
run interleaved in one process (the order alternates every round), medians, ratio to the
original. ``seed`` is seed 004's metric overhead(global) / overhead(ig) (n/a when ig's overhead is
within noise of zero or negative). ``alarms``: after the timed rounds, every hardened graph's twin
with its detection flags exposed runs on the same fault-free inputs (``--alarm-runs`` times, each
on fresh random inputs); any flag raised is a false alarm.

Models: the bundled sample ``vit`` and ``resnet``, and ViT-S/16- and ViT-B/16-sized graphs with
random weights (``benchmarks/vit_graph.py``).
"""
from __future__ import annotations

import argparse
import gc
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

from bench_harden import feeds, load, session  # noqa: E402
from onnxft.campaigns.abft_impl import autotune, resolve  # noqa: E402
from onnxft.campaigns.harden import fix_batch  # noqa: E402
from onnxft.passes.abft import abft  # noqa: E402
from onnxft.runtime.ridge import ridge_point  # noqa: E402

VARIANTS = ("global", "fused", "dup", "ig0", "ig", "ig+autotune")
NAMES = {"vit-s": "vit-s16", "vit-b": "vit-b16"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,resnet,vit-s,vit-b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=9,
                    help="interleaved rounds at least; small graphs get more, up to --budget seconds per variant")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timed runs per variant for small graphs")
    ap.add_argument("--tune-repeats", type=int, default=4, help="profiled rounds of --autotune")
    ap.add_argument("--alarm-runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="which to time (ViT-B at batch 8 with all six sessions needs about 14 GB: leave dup out)")
    ap.add_argument("--tune-candidates", default="global,fused,dup")
    ap.add_argument("--pairwise", action="store_true",
                    help="one (original, variant) session pair open at a time (ViT-B at batch 8 on a small machine)")
    ap.add_argument("--ridge", type=float, default=None, help="FLOP/byte (default: measured once, cached)")
    ap.add_argument("--ber", type=float, default=1e-8)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                    help="cpu: the calling thread's CPU time (onnxruntime runs there with --threads 1)")
    args = ap.parse_args(argv)
    point = ridge_point("cpu", args.threads, args.ridge)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# onnxruntime {ort.__version__}, CPU, threads {args.threads}, {args.clock} clock, {args.repeats} "
          f"interleaved repeats or more, ridge {point['ridge']:.3g} FLOP/byte ({point['source']}), load average "
          f"{load_avg:.1f} at start")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    head = f"{'model':<8} {'batch':>5} {'orig ms':>8} " + " ".join(f"{v:>11}" for v in variants)
    print(head + f" {'seed':>6} {'ig picks / autotuned':>22} {'alarms':>6}", flush=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.models.split(","):
            base_model = load(NAMES.get(name, name))
            for batch in (int(b) for b in args.batches.split(",")):
                model = fix_batch(base_model, batch)
                x = feeds(model, batch)
                shapes = {k: [1, *v.shape[1:]] for k, v in x.items()}
                kw = dict(scheme="lb", ber=args.ber, shapes=shapes)
                impls = {v: v for v in ("global", "fused", "dup") if v in variants}
                if "ig0" in variants:  # ig by the byte rule alone (before FUSED_MIN_A_BYTES)
                    impls["ig0"], _ = resolve("ig", model, x, point, fused_min_a_bytes=float("inf"))
                if "ig" in variants:
                    impls["ig"], _ = resolve("ig", model, x, point)
                if "ig+autotune" in variants:
                    impls["ig+autotune"] = {k: r["impl"] for k, r in autotune(
                        model, x, tuple(args.tune_candidates.split(",")), "cpu", args.threads, args.tune_repeats,
                        **kw).items()}
                # all variants interleaved with the original in one loop, or (--pairwise, for graphs
                # too large to hold every session at once) each variant interleaved with its own
                # original session, one pair open at a time: ratio = variant / that pair's original
                groups = [list(impls)] if not args.pairwise else [[v] for v in impls]
                times, ratio = {}, {}
                for group in groups:
                    sessions = {"original": session(model, args.threads, tmp, "orig")}
                    for v in group:
                        sessions[v] = session(abft(model, impl=impls[v], **kw).model, args.threads, tmp, v)
                    for s in sessions.values():
                        for _ in range(2):
                            s.run(None, x)
                    t0 = clock()
                    sessions["original"].run(None, x)
                    repeats = max(args.repeats, min(300, int(args.budget / max(clock() - t0, 1e-6))))
                    got = {k: [] for k in sessions}
                    order = list(sessions.items())
                    for i in range(repeats):
                        for k, s in (order if i % 2 == 0 else order[::-1]):
                            t0 = clock()
                            s.run(None, x)
                            got[k].append(clock() - t0)
                    del sessions, order
                    gc.collect()
                    base = statistics.median(got["original"])
                    times.setdefault("original", []).extend(got["original"])
                    ratio.update({v: statistics.median(got[v]) / base for v in group})
                alarms = 0
                rng = np.random.default_rng(batch)
                for v, impl in impls.items():
                    s = session(abft(model, impl=impl, expose_flags=True, **kw).model, args.threads, tmp, v + "_flags")
                    names = [o.name for o in s.get_outputs()]
                    for _ in range(args.alarm_runs):
                        xi = {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in x.items()}
                        alarms += sum(bool(o) for n, o in zip(names, s.run(None, xi)) if n.endswith(".detected"))
                base = statistics.median(times["original"])
                og, oi = ratio.get("global", 0) - 1, ratio.get("ig", 0) - 1
                seed = f"{og / oi:6.2f}" if oi > 0.005 and og > -1 else f"{'n/a':>6}"
                tag = "/".join(",".join(f"{picks_of(impls[v], k)}{k[0]}" for k in ("global", "fused", "dup")
                                        if picks_of(impls[v], k)) for v in ("ig", "ig+autotune") if v in impls)
                print(f"{name:<8} {batch:>5} {base * 1e3:>8.2f} " + " ".join(f"{ratio[v]:>11.3f}" for v in variants)
                      + f" {seed} {tag:>22} {alarms:>6}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    print("# ratios: hardened / original (medians); seed = overhead(global) / overhead(ig); ig picks: "
          "ig's / ig --autotune's choice counts (g global, f fused, d dup)")
    return 0


def picks_of(impl, which: str) -> int:
    """GEMMs given ``which``: a fixed implementation (str) counts as all, shown as the GEMM count."""
    return sum(v == which for v in impl.values()) if isinstance(impl, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
