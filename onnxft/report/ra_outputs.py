"""Table, JSON, CSV and plot of an ``onnxft ra`` result (written atomically)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .outputs import atomic_write, save_figure


def _measure(r: dict) -> str:
    return "1 - SDC - DUE" if r.get("metric") == "sdc" else "top-1"


def ra_table(r: dict) -> str:
    head = f"{r['model']}  ({r['items']} items, fault model {r['hw']}, RA = {_measure(r)}, clean {r['clean']:.4f})"
    if r.get("outputs"):
        o = r["outputs"]
        head += f"\n  outputs checked: {', '.join(o['checked'])}; SDC = {o['sdc_criterion']}"
    if "points" in r:
        lines = [head, f"  conditional campaigns: k = 0..{r['k_max']}, {r['inferences']} inferences, "
                       f"{r['bits_per_item']} bits per inference",
                 f"  {'BER':>10}  {'accuracy':>9}  {'95% CI':>17}  {'flips/item':>10}  truncation"]
        for p in r["points"]:
            lines.append(f"  {p['ber']:>10.3g}  {p['value']:>9.4f}  [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}]  "
                         f"{p['faults_per_item']:>10.3g}  {p['truncation']:.1e}")
        lines.append(f"  {'k':>3}  {'RA_k':>7}  {'95% CI':>17}  inferences")
        for q in r["per_k"]:
            lines.append(f"  {q['k']:>3}  {q['ra']:>7.4f}  [{q['ci'][0]:.4f}, {q['ci'][1]:.4f}]  {q['n']}")
        return "\n".join(lines)
    lines = [head, f"  RA_{r['k']} = {r['ra']:.4f}  95% CI [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]  "
                   f"({r['method']}, {r['inferences']} inferences, ESS {r['ess']:.0f})"]
    if "sdc" in r:
        lines.append(f"  SDC {r['sdc']:.4f} [{r['sdc_ci'][0]:.4f}, {r['sdc_ci'][1]:.4f}]  "
                     f"DUE {r['due']:.4f} [{r['due_ci'][0]:.4f}, {r['due_ci'][1]:.4f}]  (given {r['k']} fault(s))")
    return "\n".join(lines)


def ra_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    if "points" in r:
        w.writerow(["model", "hw", "ber", "value", "ci_low", "ci_high", "truncation", "faults_per_item", "inferences"])
        for p in r["points"]:
            w.writerow([r["model"], r["hw"], p["ber"], p["value"], p["ci"][0], p["ci"][1], p["truncation"],
                        p["faults_per_item"], r["inferences"]])
    else:
        w.writerow(["model", "hw", "k", "method", "metric", "ra", "ci_low", "ci_high", "sdc", "sdc_low", "sdc_high",
                    "due", "due_low", "due_high", "inferences", "ess", "clean"])
        w.writerow([r["model"], r["hw"], r["k"], r["method"], r.get("metric", "top1"), r["ra"], r["ci"][0], r["ci"][1],
                    r.get("sdc"), *(r.get("sdc_ci") or [None, None]), r.get("due"), *(r.get("due_ci") or [None, None]),
                    r["inferences"], r["ess"], r["clean"]])
    return buf.getvalue()


def ra_plot(r: dict, path: str | Path, direct: list[dict] | None = None) -> Path:
    """The curve (with --curve), and optionally direct ``eval`` points on the same axes; or RA with
    its interval against the fault-free accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if "points" in r:
        pts = [p for p in r["points"] if p["ber"] > 0]
        xs = [p["ber"] for p in pts]
        ax.errorbar(xs, [p["value"] for p in pts], yerr=[[p["value"] - p["ci"][0] for p in pts],
                                                         [p["ci"][1] - p["value"] for p in pts]],
                    marker="o", capsize=3, label=f"conditional campaigns ({r['inferences']} inferences)")
        if direct:
            dx = [p["ber"] for p in direct if p["ber"] > 0]
            dp = [p for p in direct if p["ber"] > 0]
            ax.errorbar([x * 1.04 for x in dx], [p["value"] for p in dp],
                        yerr=[[p["value"] - p["ci"][0] for p in dp], [p["ci"][1] - p["value"] for p in dp]],
                        marker="s", capsize=3, ls="none", label=f"direct eval ({sum(p['n'] for p in dp)} inferences)")
        ax.set_xscale("log")
        ax.set_xlabel("bit error rate (per bit of each operation result)")
        ax.set_ylabel("top-1 accuracy" if r.get("metric") != "sdc" else "1 - SDC - DUE")
    else:
        ax.bar([0, 1], [r["clean"], r["ra"]], yerr=[[0, r["ra"] - r["ci"][0]], [0, r["ci"][1] - r["ra"]]],
               capsize=4, color=["#999999", "#1f77b4"])
        ax.set_xticks([0, 1], ["fault-free", f"RA_{r['k']} ({r['hw']}, {r['method']})"])
        ax.set_ylabel("top-1 accuracy" if r.get("metric") != "sdc" else "1 - SDC - DUE")
    ax.axhline(r["clean"], ls=":", lw=0.8, color="grey")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8) if "points" in r else None
    ax.set_title(r["model"], fontsize=10)
    return save_figure(fig, path)


def write_ra_outputs(r: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [atomic_write(out / "results.json", json.dumps(r, indent=2)), atomic_write(out / "results.csv", ra_csv(r)),
            ra_plot(r, out / ("accuracy_vs_ber.png" if "points" in r else "ra.png"))]
