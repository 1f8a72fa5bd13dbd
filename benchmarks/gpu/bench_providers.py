"""Clean vs injected per-inference time for several models, BERs and providers, sessions opened once.

    python benchmarks/gpu/bench_providers.py --models vit,vit-b16 --bers 0,1e-10,1e-8 --providers cuda,cpu

The measurement is onnxft.campaigns.bench.bench's (interleaved clean and injected runs, medians;
the injected time covers sampling the faults, building the fault tables and the run), but the
clean session and the injection session of a model are opened once for all BERs: for ViT-B/16,
opening the injection graph costs more than the runs themselves. Models are bundled sample names,
.onnx paths, or presets of benchmarks/vit_graph.py (built once, random weights).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxft.api as ft  # noqa: E402
from bench_injection import resolve  # noqa: E402
from onnxft.campaigns.evaluate import trial_rng  # noqa: E402
from onnxft.report.outputs import atomic_write  # noqa: E402
from onnxft.faults.sampling import Faults, sample_faults  # noqa: E402
from onnxft.passes.inject import inject  # noqa: E402
from onnxft.runtime.data import fixed_batch, input_specs, synthetic  # noqa: E402
from onnxft.runtime.session import InjectionSession, make_session, with_static_inputs  # noqa: E402


def bench_bers(model, bers, batch, provider, repeats, warmup=3, seed=0, threads=None) -> list[dict]:
    batch = fixed_batch(input_specs(model)) or batch
    feeds = synthetic(input_specs(model), batch, seed)
    t0 = time.perf_counter()
    clean = make_session(with_static_inputs(model, feeds), provider, threads)
    injected = InjectionSession(inject(model).model, provider, threads)
    plans = injected.plans(feeds)
    open_s = time.perf_counter() - t0
    out_names = [o.name for o in clean.get_outputs()]
    rows = []
    for ber in bers:
        n_faults = []

        def run_injected(i):
            faults = sample_faults(plans, ber, trial_rng(seed, i, 0)) if ber > 0 else Faults.empty()
            n_faults.append(len(faults))
            injected.run(feeds, faults, plans)

        for i in range(warmup):
            clean.run(out_names, feeds)
            run_injected(10_000 + i)
        n_faults.clear()
        tc, ti = [], []
        for i in range(repeats):
            t1 = time.perf_counter()
            clean.run(out_names, feeds)
            t2 = time.perf_counter()
            run_injected(i)
            t3 = time.perf_counter()
            tc.append(t2 - t1)
            ti.append(t3 - t2)
        c, j = float(np.median(tc) * 1e3), float(np.median(ti) * 1e3)
        rows.append({"provider": ",".join(injected.providers), "ber": ber, "batch": batch, "repeats": repeats,
                     "sites": len(injected.table.sites), "clean_ms": c, "injected_ms": j, "ratio": j / c,
                     "faults_per_run": float(np.mean(n_faults)), "open_s": round(open_s, 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit-b16")
    ap.add_argument("--bers", default="0,1e-10,1e-8")
    ap.add_argument("--providers", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    bers = [float(b) for b in args.bers.split(",")]
    rows = []
    print(f"{'model':<22} {'provider':<9} {'sites':>5} {'batch':>5} {'BER':>7} {'clean ms':>9} {'injected ms':>11}"
          f" {'ratio':>6} {'flips/run':>10} {'open s':>6}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxft-bench-") as td:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = resolve(name, Path(td))
            if path is None:
                continue
            model, _, _ = ft.load(path)
            for prov in [p.strip() for p in args.providers.split(",") if p.strip()]:
                for r in bench_bers(model, bers, args.batch, prov, args.repeats, seed=args.seed,
                                    threads=args.threads):
                    r["model"], r["provider_arg"] = name, prov
                    rows.append(r)
                    print(f"{name:<22} {prov:<9} {r['sites']:>5} {r['batch']:>5} {r['ber']:>7.0e} {r['clean_ms']:>9.2f}"
                          f" {r['injected_ms']:>11.2f} {r['ratio']:>6.2f} {r['faults_per_run']:>10.1f}"
                          f" {r['open_s']:>6}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
