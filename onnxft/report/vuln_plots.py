"""Tables, CSV and plots of ``onnxft vuln`` results, in the style of the seed paper's figures
(vulnerability-factor bars per layer and module, a heatmap over input patches, accuracy against
BER with the target BERs marked). All files are written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .outputs import atomic_write, save_figure

_TITLES = {"layer": "layer", "module": "module", "optype": "op type", "patch": "input patch", "bit": "bit position"}


def _ber_label(run: dict) -> str:
    if run["target_loss"] is not None:
        return f"{run['target_loss'] * 100:g}% loss (BER {run['ber']:.2g})"
    return f"BER {run['ber']:.2g}"


def vuln_table(result: dict) -> str:
    lines = [f"{result['model']}  ({result['items']} items, {result['sites']} sites, clean top-1 {result['clean']:.4f},"
             f" {result['seconds']:.0f} s)"]
    for s in result["searches"]:
        for t in s["targets"]:
            lines.append(f"  {s['part']} faults: {t['loss'] * 100:g}% {result['loss_mode']} loss "
                         f"(accuracy {t['target_accuracy']:.4f}) at BER {t['ber']:.3g}")
    for run in result["runs"]:
        lines.append(f"  {run['part']} faults at {_ber_label(run)}: unprotected accuracy {run['accuracy']:.4f} "
                     f"[{run['accuracy_ci'][0]:.4f}, {run['accuracy_ci'][1]:.4f}], {run['trials']} trials x "
                     f"{result['items']} items, {run['faults_per_item']:.3g} flips/item, DUE (NaN/Inf) "
                     f"{run.get('due', 0.0):.4f}")
        lines.append(f"    {'granularity':<11} {'component':<24} {'VF':>7}  {'95% CI':>17}  {'ops share':>9}")
        for f in run["factors"]:
            lines.append(f"    {f['granularity']:<11} {f['name']:<24} {f['factor']:>+7.4f}  "
                         f"[{f['ci'][0]:+.4f}, {f['ci'][1]:+.4f}]  {f['share']:>9.4f}")
    return "\n".join(lines)


def vuln_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "part", "granularity", "component", "ber", "target_loss", "factor", "ci_lo", "ci_hi",
                "n", "sites", "ops_share", "faults_share", "unprotected_accuracy", "clean", "unprotected_due"])
    for run in result["runs"]:
        for f in run["factors"]:
            w.writerow([result["model"], run["part"], f["granularity"], f["name"], run["ber"], run["target_loss"],
                        f["factor"], f["ci"][0], f["ci"][1], f["n"], f["sites"], f["share"], f["faults_share"],
                        run["accuracy"], result["clean"], run.get("due", 0.0)])
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars_plot(result: dict, granularity: str, path) -> Path | None:
    """Grouped bars: one group per component, one bar per BER, 95% intervals as error bars."""
    runs = [r for r in result["runs"] if any(f["granularity"] == granularity for f in r["factors"])]
    if not runs:
        return None
    plt = _plt()
    names = [f["name"] for f in runs[0]["factors"] if f["granularity"] == granularity]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) * max(1, len(runs) ** 0.5) + 1.5), 3.8), dpi=120)
    for k, run in enumerate(runs):
        fs = {f["name"]: f for f in run["factors"] if f["granularity"] == granularity}
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
        ys = [fs[n]["factor"] for n in names]
        err = [[fs[n]["factor"] - fs[n]["ci"][0] for n in names], [fs[n]["ci"][1] - fs[n]["factor"] for n in names]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=_ber_label(run))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                       fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("vulnerability factor\n(accuracy protected - unprotected)")
    ax.set_title(f"{result['model']}: vulnerability per {_TITLES.get(granularity, granularity)}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def patch_heatmap(result: dict, path) -> Path | None:
    runs = [r for r in result["runs"] if r["part"] == "input"]
    grid = result.get("patch_grid")
    if not runs or not grid:
        return None
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs) + 0.6, 3.4), dpi=120, squeeze=False)
    vmax = max(max(abs(f["factor"]) for f in r["factors"]) for r in runs) or 1.0
    for ax, run in zip(axes[0], runs):
        m = np.zeros((grid["rows"], grid["cols"]))
        for f in run["factors"]:
            m[f["info"]["row"], f["info"]["col"]] = f["factor"]
        im = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(m.min())), vmax=vmax)
        ax.set_title(_ber_label(run), fontsize=8)
        ax.set_xticks(range(grid["cols"]))
        ax.set_yticks(range(grid["rows"]))
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{result['model']}: vulnerability factor per input patch "
                 f"({grid['patch'][0]}x{grid['patch'][1]} px)", fontsize=10)
    return save_figure(fig, path)


def accuracy_plot(result: dict, path) -> Path | None:
    """Accuracy against BER from the BER search, targets marked."""
    if not result["searches"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for s in result["searches"]:
        pts = sorted(s["points"])
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                        label=f"{s['part']} faults" if s["part"] == "input" else "network faults")
        for t in s["targets"]:
            ax.axvline(t["ber"], color=line.get_color(), ls="--", lw=0.8)
            ax.annotate(f"{t['loss'] * 100:g}%", (t["ber"], t["target_accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=line.get_color())
    ax.axhline(result["clean"], ls=":", lw=0.8, color="gray", label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['model']}: accuracy vs BER, target BERs marked", fontsize=10)
    return save_figure(fig, path)


def write_vuln_outputs(result: dict, out_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write(out / "results.json", json.dumps(result, indent=2)),
               atomic_write(out / "results.csv", vuln_csv(result))]
    for g in ("layer", "module", "optype", "bit"):
        p = bars_plot(result, g, out / f"vuln_{g}.png")
        if p:
            written.append(p)
    for p in (patch_heatmap(result, out / "vuln_patch.png"), accuracy_plot(result, out / "accuracy_vs_ber.png")):
        if p:
            written.append(p)
    return written
