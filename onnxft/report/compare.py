"""Tables, files and plots of ``onnxft compare``."""
from __future__ import annotations

import json
from pathlib import Path

from .outputs import atomic_write, eval_plot, outcomes_plot, save_figure


def compare_table(out: dict) -> str:
    bers = out["bers"]
    head = f"{'scheme':<12} {'clean':>6} " + " ".join(
        f"{'acc@' + format(b, 'g'):>12} {'SDC':>6} {'DUE':>6} {'ops+':>7}" for b in bers)
    lines = [f"{out.get('model', 'model')}: {out['items']} items x {out['trials']} trials; block sizes for BER "
             f"{out['design_ber']:g}; ops+ = expected extra operations / the model's operations; SDC/DUE = rates "
             "of silent / NaN-Inf outcomes"
             + ("; protection faulted too (checks and recovery)" if out.get("inject_protection") else "")
             + ("; arithmetic on constants faulted too" if out.get("fault_constants") else ""), head]
    for row in out["schemes"]:
        cells = []
        for p in row["points"]:
            cells.append(f"{p['accuracy']:>12.4f} {p['sdc']:>6.4f} {p['due']:>6.4f} {100 * p['overhead_ops']:>6.2f}%")
        line = f"{row['scheme']:<12} {row['clean']:>6.4f} " + " ".join(cells)
        if "latency" in row:
            line += f"   latency x{row['latency']['ratio']:.3f}"
        lines.append(line)
    return "\n".join(lines)


def compare_csv(out: dict) -> str:
    rows = ["scheme,ber,accuracy,ci_lo,ci_hi,overhead_ops,clean,latency_ratio,sdc,sdc_ci_lo,sdc_ci_hi,due,due_ci_lo,"
            "due_ci_hi,masked"]
    for row in out["schemes"]:
        lat = row.get("latency", {}).get("ratio", "")
        for p in row["points"]:
            rows.append(f"{row['scheme']},{p['ber']:g},{p['accuracy']:.6f},{p['ci'][0]:.6f},{p['ci'][1]:.6f},"
                        f"{p['overhead_ops']:.6g},{row['clean']:.6f},{lat},{p['sdc']:.6f},{p['sdc_ci'][0]:.6f},"
                        f"{p['sdc_ci'][1]:.6f},{p['due']:.6f},{p['due_ci'][0]:.6f},{p['due_ci'][1]:.6f},"
                        f"{p['masked']:.6f}")
    return "\n".join(rows) + "\n"


def overhead_plot(out: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    schemes = [r["scheme"] for r in out["schemes"]]
    bers = out["bers"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    width = 0.8 / max(len(bers), 1)
    x = np.arange(len(schemes))
    for k, b in enumerate(bers):
        vals = [100 * next(p["overhead_ops"] for p in r["points"] if p["ber"] == b) for r in out["schemes"]]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=f"BER {b:g}")
    ax.set_xticks(x, schemes)
    ax.set_ylabel("extra operations (% of the model's)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_compare_outputs(out: dict, out_dir: str | Path) -> list[Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    title = f"{out.get('model', 'model')}: protection schemes under injection"
    return [atomic_write(d / "compare.json", json.dumps(out, indent=2) + "\n"),
            atomic_write(d / "compare.csv", compare_csv(out)),
            eval_plot(out["eval_results"], d / "accuracy_vs_ber.png", title),
            outcomes_plot(out["eval_results"], d / "outcomes_vs_ber.png", title),
            overhead_plot(out, d / "overhead.png")]
