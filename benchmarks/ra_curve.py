"""Accuracy against BER from conditional campaigns (``onnxft ra --curve``) against direct ``eval``.

    python benchmarks/ra_curve.py                                   # sample ViT, 256 items
    python benchmarks/ra_curve.py --model vit --limit 256 --trials 4 --out docs/figures/ra_curve
    python benchmarks/ra_curve.py --bers 1e-9,2e-9,4e-9,7e-9,1e-8 --curve-batch 8 --out docs/figures/ra_curve_high

Direct: ``onnxft eval`` at 5 BERs, ``trials`` passes over the items at each (items x trials x 5
inferences). Conditional: ``onnxft ra --curve`` with a budget of one fifth of that over
k = 1..k_max, plus one fault-free pass for RA_0. Prints both with their 95% intervals, whether they
agree (intervals overlap), the inference counts, the interval widths and the wall times, and per
BER the floor of the width ratio (the whole conditional budget spent on that BER alone); writes
results.json and accuracy_vs_ber.png (both curves on one chart) under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxft.api as ft
from onnxft.report.outputs import atomic_write
from onnxft.report.ra_outputs import ra_plot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--curve-batch", type=int, default=16, help="batch of the conditional runs (one per k at least)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--bers", default="1e-10,3e-10,1e-9,2e-9,3e-9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    bers = [float(b) for b in a.bers.split(",")]
    t0 = time.perf_counter()
    direct = ft.evaluate(a.model, bers=bers, trials=a.trials, seed=a.seed, batch=a.batch, limit=a.limit,
                         provider="cpu", threads=a.threads)
    t_direct = time.perf_counter() - t0
    direct_n = sum(p.n for p in direct.points)
    t0 = time.perf_counter()
    curve = ft.ra(a.model, curve_bers=bers, budget=direct_n // 5 - direct.items, seed=a.seed, batch=a.curve_batch,
                  limit=a.limit, provider="cpu", threads=a.threads)
    t_curve = time.perf_counter() - t0
    # What this estimator could do at each BER if the whole conditional budget served that BER
    # alone (Neyman over its own k's): variance (sum_k P_b(k) sqrt(E[d^2|k]))^2 / N, with E[d^2|k]
    # from the pooled model fitted to all conditional inferences. A floor for any allocation.
    import numpy as np

    from onnxft.campaigns import ra as _ra

    ks = np.concatenate([np.full(q["n"], q["k"]) for q in curve["per_k"][1:]])
    moved = np.concatenate([np.arange(q["n"]) < q["moved"] for q in curve["per_k"][1:]])
    m2 = _ra.moved_rate_model(ks, moved, curve["k_max"])
    n_cond = curve["inferences"] - direct.items
    best = []
    for d in direct.points:
        pmf = _ra.binomial_pmf(curve["bits_per_item"], d.ber, np.arange(1, curve["k_max"] + 1))
        v_best = float(pmf @ np.sqrt(m2)) ** 2 / n_cond
        v_direct = d.value * (1 - d.value) / d.n
        best.append(float(np.sqrt(v_best / v_direct)))
    rows = []
    print(f"{a.model}: {direct.items} items; direct eval {direct_n} inferences ({t_direct:.0f} s), "
          f"conditional {curve['inferences']} inferences incl. {direct.items} fault-free ({t_curve:.0f} s), "
          f"k_max {curve['k_max']}")
    print(f"  {'BER':>8}  {'direct':>7}  {'95% CI':>17}  {'conditional':>11}  {'95% CI':>17}  agree  half-width ratio"
          "  (floor)")
    for d, c, floor in zip(direct.points, curve["points"], best):
        agree = bool(d.ci[0] <= c["ci"][1] and c["ci"][0] <= d.ci[1])
        ratio = (c["ci"][1] - c["ci"][0]) / max(d.ci[1] - d.ci[0], 1e-12)
        rows.append({"ber": d.ber, "direct": d.value, "direct_ci": list(d.ci), "conditional": c["value"],
                     "conditional_ci": c["ci"], "truncation": c["truncation"], "agree": agree, "width_ratio": ratio,
                     "width_ratio_floor": floor})
        print(f"  {d.ber:>8.2g}  {d.value:>7.4f}  [{d.ci[0]:.4f}, {d.ci[1]:.4f}]  {c['value']:>11.4f}  "
              f"[{c['ci'][0]:.4f}, {c['ci'][1]:.4f}]  {'yes' if agree else 'NO':>5}  {ratio:>16.2f}  ({floor:.2f})")
    summary = {"model": a.model, "items": direct.items, "bers": bers, "direct_inferences": direct_n,
               "conditional_inferences": curve["inferences"], "direct_seconds": t_direct,
               "conditional_seconds": t_curve, "k_max": curve["k_max"], "rows": rows, "per_k": curve["per_k"],
               "command": "python benchmarks/ra_curve.py " + " ".join(argv or __import__("sys").argv[1:])}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", json.dumps(summary, indent=2))
        ra_plot(curve, out / "accuracy_vs_ber.png", direct=[dict(ber=p.ber, value=p.value, ci=list(p.ci), n=p.n)
                                                          for p in direct.points])
        print(f"wrote {out}/results.json, {out}/accuracy_vs_ber.png")


if __name__ == "__main__":
    main()
