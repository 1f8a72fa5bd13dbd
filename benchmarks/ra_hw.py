"""RA_1 under the equal-probability formulation against dataflow-aware fault probabilities.

    python benchmarks/ra_hw.py                                        # sample ViT
    python benchmarks/ra_hw.py --model resnet --hw equal,ws:128x128,os:128x128,gpu:64x64x8 --out docs/figures/ra_hw_resnet

For each ``--hw`` (and the operation-wise model, ``op``), RA_1 by importance sampling until the 95%
half-width is at most --ci-width (or --budget inferences), on the first --limit items. Prints a
table (RA_1, interval, drop from the fault-free accuracy, inferences, ESS) and writes
results.json and ra_hw.png under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxft.api as ft
from onnxft.report.outputs import atomic_write, save_figure


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    xs = range(len(rows))
    drops = [r["clean"] - r["ra"] for r in rows]
    err = [[r["ra"] - r["ci"][0] for r in rows], [r["ci"][1] - r["ra"] for r in rows]]
    ax.bar(xs, drops, yerr=[err[1], err[0]], capsize=4, color="#1f77b4")
    ax.set_xticks(list(xs), [r["hw"] for r in rows], rotation=20, fontsize=8)
    ax.set_ylabel("fault-free accuracy - RA_1 (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--hw", default="op,equal,ws:128x128,is:128x128,os:16x16,gpu:64x64x8")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ci-width", type=float, default=0.005)
    ap.add_argument("--budget", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for hw in a.hw.split(","):
        t0 = time.perf_counter()
        r = ft.ra(a.model, hw=None if hw == "op" else hw, method="is", budget=a.budget, ci_width=a.ci_width,
                  seed=a.seed, batch=a.batch, limit=a.limit, provider="cpu", threads=a.threads)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(f"  {r['hw']:>12}  RA_1 {r['ra']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]  drop {r['clean'] - r['ra']:+.4f}"
              f"  SDC {r['sdc']:.4f}  DUE {r['due']:.4f}  {r['inferences']} inferences  ESS {r['ess']:.0f}"
              f"  {r['seconds']:.0f} s", flush=True)
    print(f"{a.model}: fault-free accuracy {rows[0]['clean']:.4f} on {rows[0]['items']} items")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", json.dumps(
            {"rows": rows, "command": "python benchmarks/ra_hw.py " + " ".join(argv or __import__("sys").argv[1:])},
            indent=2))
        plot(rows, out / "ra_hw.png", f"{a.model}: RA_1 drop by fault model")
        print(f"wrote {out}/results.json, {out}/ra_hw.png")


if __name__ == "__main__":
    main()
