"""Merge per-scheme ``onnxft compare --json`` outputs (run one scheme group at a time, same seeds and
items, so that no single run exceeds a few minutes on a shared machine) into one table, CSV and
accuracy-vs-BER plot with the threshold counts and bytes of each clip scheme (docs/proact.md).

    onnxft compare resnet --schemes none,clip-ranger --ber 1e-6,3e-6,6e-6 --limit 500 --trials 1 --json > a.json
    onnxft compare resnet --schemes proact           --ber 1e-6,3e-6,6e-6 --limit 500 --trials 1 --json > b.json
    python benchmarks/proact_merge.py a.json b.json --out docs/figures/resnet_proact
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxft.report.outputs import atomic_write, save_figure


def merge(paths: list[str]) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        if r["bers"] != first["bers"] or r["items"] != first["items"] or r["trials"] != first["trials"]:
            raise SystemExit("the runs differ in BERs, items or trials: they cannot be merged")
    return {"model": first.get("model"), "bers": first["bers"], "items": first["items"], "trials": first["trials"],
            "schemes": [row for r in runs for row in r["schemes"]]}


def table(out: dict) -> str:
    bers = out["bers"]
    head = ("| scheme | thresholds | bytes | train s | clean | " + " | ".join(f"BER {b:g}" for b in bers) + " |")
    lines = [head, "|" + "---|" * (5 + len(bers))]
    for row in out["schemes"]:
        c = row["info"].get("clip", {})
        cells = [f"{p['accuracy']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" for p in row["points"]]
        lines.append(f"| {row['scheme']} | {c.get('thresholds', '-')} | {c.get('bytes', '-')} | "
                     f"{c['train_seconds']:.0f} | " if c else f"| {row['scheme']} | - | - | - | ")
        lines[-1] += f"{row['clean']:.3f} | " + " | ".join(cells) + " |"
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for row in out["schemes"]:
        b = [p["ber"] for p in row["points"]]
        a = [p["accuracy"] for p in row["points"]]
        lo = [p["accuracy"] - p["ci"][0] for p in row["points"]]
        hi = [p["ci"][1] - p["accuracy"] for p in row["points"]]
        ax.errorbar(b, a, yerr=[lo, hi], marker="o", capsize=3, label=row["scheme"])
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (operation-wise fault model)")
    ax.set_ylabel(f"top-1 ({out['items']} items, {out['trials']} trial(s), 95% CI)")
    ax.set_title(f"{out.get('model')}: clipped activations under injection")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="compare --json outputs")
    ap.add_argument("--out", required=True, help="directory for compare.json, table.md, accuracy_vs_ber.png")
    args = ap.parse_args()
    out = merge(args.runs)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "compare.json", json.dumps(out, indent=2) + "\n")
    atomic_write(d / "table.md", table(out) + "\n")
    plot(out, d / "accuracy_vs_ber.png")
    print(table(out))


if __name__ == "__main__":
    main()
