"""Clean vs injected CPU time per inference, one ORT thread: the stable figure on a shared machine.

    python benchmarks/bench_cpu_time.py --models vit --bers 0,1e-10,1e-8 --repeats 30

Same measurement as onnxft.campaigns.bench (sampling + tables + run, medians, clean and injected
runs interleaved) but timed with time.thread_time in a single-threaded session, so that other
processes on the machine barely move the figures (wall-clock ratios swing by tens of percent on
a loaded 2-core box). Models as in bench_injection.py (sample names, .onnx paths, vit-b16 ...).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_injection import resolve  # noqa: E402
from onnxft.campaigns.evaluate import campaign_graph, trial_rng  # noqa: E402
from onnxft.faults.sampling import Faults, sample_faults  # noqa: E402
from onnxft.runtime.data import input_specs, synthetic  # noqa: E402
from onnxft.runtime.model_io import load_model  # noqa: E402
from onnxft.runtime.session import InjectionSession, make_session, with_static_inputs  # noqa: E402


def cpu_ratios(path: str, bers: list[float], batch: int, repeats: int, seed: int = 0) -> dict:
    model = load_model(path)
    feeds = synthetic(input_specs(model), batch, seed)
    injected = InjectionSession(campaign_graph(model), "cpu", threads=1)
    clean = make_session(with_static_inputs(model, feeds), "cpu", threads=1)
    plans = injected.plans(feeds)
    outputs = [o.name for o in clean.get_outputs()]

    def run_injected(ber, i):
        faults = sample_faults(plans, ber, trial_rng(seed, i, 0)) if ber > 0 else Faults.empty()
        injected.run(feeds, faults, plans)

    for i in range(2):  # warm-up
        clean.run(outputs, feeds)
        for ber in bers:
            run_injected(ber, 10_000 + i)
    tc, ti = [], {b: [] for b in bers}
    for i in range(repeats):
        t = time.thread_time()
        clean.run(outputs, feeds)
        tc.append(time.thread_time() - t)
        for ber in bers:
            t = time.thread_time()
            run_injected(ber, i)
            ti[ber].append(time.thread_time() - t)
    clean_ms = float(np.median(tc) * 1e3)
    return {"clean_ms": clean_ms, "injected_ms": {b: float(np.median(ti[b]) * 1e3) for b in bers},
            "ratio": {b: float(np.median(ti[b]) * 1e3) / clean_ms for b in bers}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit-b16")
    ap.add_argument("--bers", default="0,1e-10,1e-8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    bers = [float(b) for b in args.bers.split(",")]
    print(f"{'model':<12} {'clean cpu ms':>12}  " + "  ".join(f"{'BER ' + format(b, 'g'):>16}" for b in bers))
    with tempfile.TemporaryDirectory(prefix="onnxft-bench-") as td:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = resolve(name, Path(td))
            if path is None:
                continue
            r = cpu_ratios(path, bers, args.batch, args.repeats)
            cells = [f"{r['injected_ms'][b]:8.1f} ({r['ratio'][b]:.2f})" for b in bers]
            print(f"{name:<12} {r['clean_ms']:>12.1f}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
