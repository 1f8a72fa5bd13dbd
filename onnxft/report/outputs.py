"""Tables, JSON, CSV and plots for campaign results. All files are written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..runtime.model_io import write_atomically


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    payload = data.encode() if isinstance(data, str) else data
    return write_atomically(Path(path), lambda tmp: Path(tmp).write_bytes(payload))


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and close it (campaigns draw many)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def eval_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        name = "accuracy" if r["metric"] == "top1" else "SDC rate"
        lines.append(f"{r['model']}  ({r['items']} items, {r['sites']} sites, clean top-1 "
                     f"{r['clean']:.4f})" if r["metric"] == "top1" else
                     f"{r['model']}  ({r['items']} items, {r['sites']} sites)")
        o = r.get("outputs") or {}
        if o:
            ignored = ", ".join(f"{d['name']} ({d['reason']})" for d in o.get("ignored", []))
            lines.append(f"  outputs checked: {', '.join(o['checked'])}; SDC = {o['sdc_criterion']}"
                         + (f"; ignored: {ignored}" if ignored else ""))
        lines.append(f"  {'BER':>10}  {name:>9}  {'95% CI':>17}  {'SDC':>7}  {'DUE':>7}  {'masked':>7}  "
                     f"{'flips/item':>10}  trials")
        for p in r["points"]:
            lines.append(f"  {p['ber']:>10.3g}  {p['value']:>9.4f}  [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}]  "
                         f"{p.get('sdc', 0.0):>7.4f}  {p.get('due', 0.0):>7.4f}  {p.get('masked', 1.0):>7.4f}  "
                         f"{p['faults_per_item']:>10.3g}  {p['trials']}")
    return "\n".join(lines)


def eval_csv(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "metric", "ber", "value", "ci_low", "ci_high", "trials", "n", "faults_per_item", "clean",
                "sdc", "sdc_ci_low", "sdc_ci_high", "due", "due_ci_low", "due_ci_high", "masked"])
    for r in results:
        for p in r["points"]:
            w.writerow([r["model"], r["metric"], p["ber"], p["value"], p["ci"][0], p["ci"][1], p["trials"],
                        p["n"], p["faults_per_item"], r["clean"], p["sdc"], p["sdc_ci"][0], p["sdc_ci"][1],
                        p["due"], p["due_ci"][0], p["due_ci"][1], p["masked"]])
    return buf.getvalue()


def outcomes_plot(results: list[dict], path: str | Path, title: str | None = None) -> Path:
    """SDC (solid) and DUE (dashed) rates against BER, one colour per model, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in results:
        pts = [p for p in r["points"] if p["ber"] > 0]
        if not pts:
            continue
        xs = [p["ber"] for p in pts]
        line = None
        for key, style in (("sdc", "-"), ("due", "--")):
            ys = [p[key] for p in pts]
            err = [[max(0.0, p[key] - p[key + "_ci"][0]) for p in pts],
                   [max(0.0, p[key + "_ci"][1] - p[key]) for p in pts]]
            c = ax.errorbar(xs, ys, yerr=err, marker="o" if key == "sdc" else "s", ls=style, capsize=3,
                            label=f"{r['model']} {key.upper()}", color=None if line is None else line)
            line = c.lines[0].get_color()
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (per bit of each operation result)")
    ax.set_ylabel("rate (items x trials)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "SDC (silent, finite and wrong) and DUE (NaN/Inf)", fontsize=10)
    return save_figure(fig, path)


def eval_plot(results: list[dict], path: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    zero_ber = None
    for r in results:
        pts = [p for p in r["points"] if p["ber"] > 0]
        if not pts:
            continue
        xs = [p["ber"] for p in pts]
        ys = [p["value"] for p in pts]
        lo = [max(0.0, p["value"] - p["ci"][0]) for p in pts]  # (Wilson's bound can round past the value)
        hi = [max(0.0, p["ci"][1] - p["value"]) for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=r["model"])
        zero_ber = min(xs) if zero_ber is None else min(zero_ber, min(xs))
        if r["metric"] == "top1":
            ax.axhline(r["clean"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (per bit of each operation result)")
    metric = results[0]["metric"] if results else "top1"
    ax.set_ylabel("top-1 accuracy" if metric == "top1" else "SDC rate (top-1 changed)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def write_eval_outputs(results: list[dict], out_dir: str | Path, title: str | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else {"results": results}
    written = [atomic_write(out / "results.json", json.dumps(payload, indent=2)),
               atomic_write(out / "results.csv", eval_csv(results))]
    written.append(eval_plot(results, out / "accuracy_vs_ber.png", title))
    written.append(outcomes_plot(results, out / "outcomes_vs_ber.png", title))
    return written


def per_layer_table(info: dict, top: int = 15) -> str:
    """The per-unit split of a hardened graph's fault-free time (``bench --per-layer``)."""
    lines = [f"  profile (per-node medians of {info['repeats']} runs, level {info['level']}): model's own nodes "
             f"{info['baseline_ms']:.2f} ms; protection {info['protection_ms']:.2f} ms "
             f"({100 * info['protection_ms'] / info['baseline_ms']:.1f}%); own nodes slower by {info['changed_ms']:+.2f} ms",
             f"  {'protected unit':<48} {'unit ms':>8} {'check ms':>9} {'nodes':>6} {'% of model':>10}"]
    for r in info["units"][:top]:
        unit_ms = "fused" if r["unit_ms"] is None else f"{r['unit_ms']:.3f}"
        lines.append(f"  {r['unit'][-48:]:<48} {unit_ms:>8} {r['protection_ms']:9.3f} {r['nodes']:6d} "
                     f"{100 * r['share_of_model']:9.1f}%")
    if len(info["units"]) > top:
        rest = sum(r["protection_ms"] for r in info["units"][top:])
        lines.append(f"  … {len(info['units']) - top} more units, {rest:.3f} ms")
    return "\n".join(lines)
