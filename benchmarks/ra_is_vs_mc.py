"""Importance sampling against plain Monte Carlo: inferences to the same 95% half-width of RA_1.

    python benchmarks/ra_is_vs_mc.py                                  # sample ViT, operation-wise model
    python benchmarks/ra_is_vs_mc.py --hw ws:128x128 --ci-width 0.01 --out docs/figures/ra_is

Both runs stop at the first batch where the interval's half-width is at most --ci-width (or at
--budget). MC: Wilson interval of the proportion of correct inferences. IS: pilot (a fifth of what
it spends, at most 20 batches) then the learned proposal; normal interval of the weighted
estimator with the fault-free accuracy as control variate. Prints inferences, wall time (one ORT
thread), both estimates and whether their intervals overlap.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxft.api as ft
from onnxft.report.outputs import atomic_write


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--hw", default=None)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ci-width", type=float, default=0.01)
    ap.add_argument("--budget", type=int, default=20000)
    ap.add_argument("--pilot", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {}
    for method in ("is", "mc"):
        t0 = time.perf_counter()
        r = ft.ra(a.model, hw=a.hw, method=method, budget=a.budget, ci_width=a.ci_width, seed=a.seed,
                  batch=a.batch, limit=a.limit, provider="cpu", threads=a.threads, pilot=a.pilot)
        r["seconds"] = time.perf_counter() - t0
        res[method] = r
        print(f"{method}: RA_1 {r['ra']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] half-width "
              f"{(r['ci'][1] - r['ci'][0]) / 2:.4f}, {r['inferences']} inferences, ESS {r['ess']:.0f}, "
              f"{r['seconds']:.0f} s (incl. setup)")
    i, m = res["is"], res["mc"]
    agree = i["ci"][0] <= m["ci"][1] and m["ci"][0] <= i["ci"][1]
    ratio = m["inferences"] / i["inferences"]
    print(f"{a.model} ({i['hw']}, clean {i['clean']:.4f}, {i['items']} items): MC/IS inferences {ratio:.1f}x, "
          f"intervals {'overlap' if agree else 'DO NOT overlap'}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        res.update({"ratio": ratio, "agree": agree,
                    "command": "python benchmarks/ra_is_vs_mc.py " + " ".join(argv or __import__("sys").argv[1:])})
        atomic_write(out / "results.json", json.dumps(res, indent=2))
        print(f"wrote {out}/results.json")


if __name__ == "__main__":
    main()
