"""ProAct's must-show table (docs/proact.md): top-1 against BER of the sample ResNet (ReLU) and ViT
(GELU) under none / Ranger / layer-wise / neuron-wise / hybrid / ProAct, same seeds, with Wilson
intervals, for operation-wise and variable-level weight faults; markdown, JSON (with the issue's
claims checked) and a plot.

Resumable stages, so that no single run takes long on a shared machine: every result is a file in
``--work`` (default ``proact_work/``, not committed) and a stage skips what is there already.

    T="python benchmarks/proact_table.py --work proact_work"
    $T train resnet --methods ranger,ranger-zero,layer,neuron,hybrid,proact   # clipped models
    $T clean resnet                                   # fault-free top-1 on the whole test set
    $T eval resnet --ber 1e-7,1e-6,1e-5 --limit 200   # one point per (scheme, BER)
    $T eval resnet --fault-model variable --hw equal --variables weight --ber 1e-6,1e-5 --limit 100
    $T table resnet vit --out docs/figures/proact_table
    $T count resnet vit model.onnx                    # thresholds per channel / per element

Seeds depend on (seed, trial, batch index) only (``campaigns.evaluate``), so every scheme and BER of
a column sees the same random streams; docs/proact.md has the commands behind the published table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from onnxft import api
from onnxft.campaigns.evaluate import evaluate
from onnxft.campaigns.spec import CampaignSpec
from onnxft.campaigns.stats import wilson_interval
from onnxft.campaigns.train_clip import ClipTrainOptions, clip_thresholds
from onnxft.report.outputs import atomic_write, save_figure
from onnxft.runtime.model_io import load_model, save_model

SCHEME_OF = {"ranger": "clip-ranger", "ranger-zero": "clip-ranger-zero", "layer": "clip-layer",
             "neuron": "clip-neuron", "hybrid": "clip-hybrid", "proact": "proact"}
ORDER = ["none", "clip-ranger", "clip-ranger-zero", "clip-layer", "clip-neuron", "clip-hybrid", "proact"]


def _work(args, model_name: str) -> Path:
    d = Path(args.work) / model_name
    d.mkdir(parents=True, exist_ok=True)
    return d


def train(args) -> None:
    model, _, default = api.load(args.model)
    data = api._train_data(model, args.train, default)
    d = _work(args, args.model)
    for method in args.methods.split(","):
        scheme = SCHEME_OF[method] + args.suffix
        if (d / f"{scheme}.json").exists():
            print(f"{scheme}: done already")
            continue
        base = "ranger" if method == "ranger-zero" else method
        opts = ClipTrainOptions(method=base, mode="zero" if method == "ranger-zero" else None, limit=args.train_limit,
                                epochs=args.epochs, penalty=args.penalty, threads=args.threads)
        t = time.perf_counter()
        res = clip_thresholds(model, data, opts, progress=print)
        save_model(res.model, d / f"{scheme}.onnx")
        rep = {k: v for k, v in res.report.items() if k != "log"}
        rep["wall_seconds"] = time.perf_counter() - t
        atomic_write(d / f"{scheme}.json", json.dumps(rep, indent=1, default=_plain) + "\n")
        print(f"{scheme}: {rep['thresholds']} thresholds, {rep['train_seconds']:.0f} s, "
              f"J={rep.get('objective')}")


def _plain(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def _spec(args, bers) -> CampaignSpec:
    spec = CampaignSpec(bers=tuple(bers), trials=args.trials, seed=args.seed, batch=args.batch, provider="cpu",
                        threads=args.threads, metric="top1")
    if args.fault_model != "operation":
        # the variable-level model (Resiliency Accuracy issue), where this onnxft has it
        spec = spec.replace(fault_model=args.fault_model, hw=args.hw, variables=tuple(args.variables.split(",")),
                            int_widths=(32, 32))  # (what eval --fault-model variable sets)
    return spec


def evaluate_schemes(args) -> None:
    model, _, default = api.load(args.model)
    data = api._dataset(model, None, default, args.limit)
    d = _work(args, args.model)
    out = d / ("eval" if args.fault_model == "operation" else f"eval_{args.fault_model}")
    out.mkdir(exist_ok=True)
    schemes = args.schemes.split(",") if args.schemes else [s for s in ORDER if s == "none" or (d / f"{s}.onnx").exists()]
    # a variant (train --suffix) only when named
    bers = [float(b) for b in args.ber.split(",")]
    for scheme in schemes:
        m = model if scheme == "none" else load_model(d / f"{scheme}.onnx")
        for ber in bers:
            f = out / f"{scheme}_{ber:g}_{args.limit}_{args.batch}_{args.trials}_{args.seed}.json"
            if f.exists():
                continue
            t = time.perf_counter()
            r = evaluate(m, data, _spec(args, [ber]).replace(model_name=scheme))
            p = r.points[0]
            row = {"scheme": scheme, "ber": ber, "clean": r.clean, "accuracy": p.value, "ci": list(p.ci),
                   "sdc": p.sdc, "due": p.due, "items": len(data), "batch": args.batch, "trials": args.trials,
                   "seed": args.seed,
                   "fault_model": args.fault_model, "seconds": time.perf_counter() - t}
            atomic_write(f, json.dumps(row) + "\n")
            print(f"{scheme} BER {ber:g}: {p.value:.3f} [{p.ci[0]:.3f}, {p.ci[1]:.3f}] (clean {r.clean:.3f}, "
                  f"{row['seconds']:.0f} s)", flush=True)


def clean(args) -> None:
    """Fault-free top-1 of every scheme on the whole test set (the clean-accuracy claim needs more
    items than the injection runs)."""
    import onnxruntime as ort

    model, _, default = api.load(args.model)
    data = api._dataset(model, None, default, None)
    d = _work(args, args.model)
    out = {}
    trained = sorted((f.stem for f in d.glob("*.onnx")), key=lambda s: (s not in ORDER, ORDER.index(s) if s in ORDER else 0, s))
    for scheme in ["none"] + trained:
        m = model if scheme == "none" else load_model(d / f"{scheme}.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        right = 0
        for s in range(0, len(data), 250):
            logits = sess.run(None, data.batch(s, min(s + 250, len(data))))[0]
            right += int((logits.argmax(axis=1) == data.labels[s:s + 250]).sum())
        out[scheme] = {"accuracy": right / len(data), "ci": list(wilson_interval(right, len(data))), "items": len(data)}
        print(f"{scheme}: {right / len(data):.4f} ({right}/{len(data)})")
    atomic_write(d / "clean.json", json.dumps(out, indent=1) + "\n")


def count(args) -> None:
    """Thresholds of neuron-wise everywhere against the hybrid (ProAct's), per channel as onnxft
    clips, and per element (every value of the activation, batch excluded), from the activation
    shapes on two items: no training needed, the counts are the architecture's."""
    from onnxft.campaigns.train_clip import profile_activations
    from onnxft.passes.clip import find_clip_sites, threshold_shape
    from onnxft.runtime.data import Dataset

    rows = []
    for name in args.models:
        model, _, default = api.load(name)
        if default is not None:
            data = api._dataset(model, None, default, 2)
        else:
            z = np.load(Path(name).with_suffix(".npz"))
            data = Dataset({k: z[k][:2] for k in z.files if k != "y"}, None)
        sites = find_clip_sites(model)
        shapes = [profile_activations(model, sites, data)[s.tensor]["shape"] for s in sites]
        per_channel = [int(np.prod(threshold_shape(tuple(sh), "neuron"))) for sh in shapes]
        per_element = [int(np.prod(sh[1:])) for sh in shapes]
        n = len(sites)
        row = {"model": Path(name).stem, "layers": n, "kinds": sorted({s.kind for s in sites}),
               "last": shapes[-1][1:], "neuron": sum(per_channel), "hybrid": n - 1 + per_channel[-1],
               "neuron_elements": sum(per_element), "hybrid_elements": n - 1 + per_element[-1]}
        row["ratio"] = row["neuron"] / row["hybrid"]
        row["ratio_elements"] = row["neuron_elements"] / row["hybrid_elements"]
        rows.append(row)
        print(f"{row['model']}: {n} {'/'.join(row['kinds'])} layers, last {row['last']}; per channel "
              f"{row['neuron']} vs {row['hybrid']} = {row['ratio']:.1f}x; per element {row['neuron_elements']} vs "
              f"{row['hybrid_elements']} = {row['ratio_elements']:.1f}x", flush=True)
    if args.out:
        atomic_write(Path(args.out), json.dumps(rows, indent=1) + "\n")


def collect(work: Path, model_name: str, trials: int, seed: int) -> dict:
    """Every stored point of ``model_name`` (one row per scheme and fault model); where a (scheme,
    BER) was run on several item counts, the largest."""
    d = work / model_name
    rows: dict = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("eval")):
        for f in sorted(sub.glob(f"*_{trials}_{seed}.json")):
            r = json.loads(f.read_text())
            key = r["scheme"] if r["fault_model"] == "operation" else f"{r['scheme']}@{r['fault_model']}"
            row = rows.setdefault(key, {"scheme": r["scheme"], "fault_model": r["fault_model"], "points": {}})
            row["points"].setdefault(r["ber"], []).append(r)
    # per (fault model, BER): the item count that most schemes ran (then the larger), so that the
    # schemes of a column are compared on the same items and seeds
    runs: dict = {}
    for row in rows.values():
        for ber, pts in row["points"].items():
            for p in pts:
                runs.setdefault((row["fault_model"], ber), []).append(p["items"])
    pick = {k: max(set(v), key=lambda n: (v.count(n), n)) for k, v in runs.items()}
    for key_, row in list(rows.items()):
        row["points"] = [next(p for p in row["points"][b] if p["items"] == pick[(row["fault_model"], b)])
                         for b in sorted(row["points"]) if any(p["items"] == pick[(row["fault_model"], b)]
                                                              for p in row["points"][b])]
        if not row["points"]:
            del rows[key_]
            continue
        largest = max(row["points"], key=lambda p: p["items"])
        row["clean"], row["clean_items"] = largest["clean"], largest["items"]
        rep = d / f"{row['scheme']}.json"
        if rep.exists():
            r = json.loads(rep.read_text())
            row["clip"] = {"thresholds": r["thresholds"], "bytes": r["bytes"], "mode": r["mode"],
                           "train_seconds": r["train_seconds"], "peak_rss_mb": r["peak_rss_mb"],
                           "objective": r.get("objective"), "layers": [[x["kind"], x["count"]] for x in r["layers"]]}
    full = json.loads((d / "clean.json").read_text()) if (d / "clean.json").exists() else {}
    for row in rows.values():
        if row["scheme"] in full:
            row["clean_full"] = full[row["scheme"]]
    key = {s: i for i, s in enumerate(ORDER)}
    return {"model": model_name, "trials": trials, "seed": seed,
            "schemes": [rows[k] for k in sorted(rows, key=lambda k: ("@" in k, key.get(rows[k]["scheme"], 99), k))]}


def _overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def claims(res: dict) -> dict:
    """The issue's must-show, per fault model, at the BERs where both rows ran the same items."""
    out = {}
    for fm in sorted({r["fault_model"] for r in res["schemes"]}):
        by = {r["scheme"]: r for r in res["schemes"] if r["fault_model"] == fm}
        if "proact" not in by:
            continue

        def common(other):
            a = {p["ber"]: p for p in by["proact"]["points"]}
            b = {p["ber"]: p for p in by[other]["points"]}
            return [(ber, a[ber], b[ber]) for ber in sorted(set(a) & set(b))
                    if (a[ber]["items"], a[ber]["batch"]) == (b[ber]["items"], b[ber]["batch"])]

        c: dict = {}
        if "clip-layer" in by:
            c["proact_ge_layer_at_two_highest_bers"] = {
                f"{ber:g}": {"proact": p["accuracy"], "layer": q["accuracy"], "holds": p["accuracy"] >= q["accuracy"],
                             "intervals_overlap": _overlap(p["ci"], q["ci"])}
                for ber, p, q in common("clip-layer")[-2:]}
        if "clip-neuron" in by:
            c["proact_inside_neuron_interval"] = {
                f"{ber:g}": {"proact": p["accuracy"], "neuron_ci": q["ci"],
                             "holds": q["ci"][0] <= p["accuracy"] <= q["ci"][1]} for ber, p, q in common("clip-neuron")}
            if by["proact"].get("clip") and by["clip-neuron"].get("clip"):
                c["neuron_over_proact_thresholds"] = (by["clip-neuron"]["clip"]["thresholds"]
                                                      / by["proact"]["clip"]["thresholds"])
        if "none" in by and "clean_full" in by["none"] and "clean_full" in by["proact"]:
            c["clean_drop_points"] = 100 * (by["none"]["clean_full"]["accuracy"] - by["proact"]["clean_full"]["accuracy"])
            c["clean_items"] = by["proact"]["clean_full"]["items"]
        out[fm] = c
    return out


def summary(c: dict) -> list[str]:
    """The claims in words, one line per fault model."""
    out = []
    for fm, x in c.items():
        parts = []
        if "proact_ge_layer_at_two_highest_bers" in x:
            v = x["proact_ge_layer_at_two_highest_bers"]
            parts.append("ProAct >= layer-wise at the two highest BERs: "
                         + ", ".join(f"{b}: {d['proact']:.3f} vs {d['layer']:.3f} "
                                     f"({'yes' if d['holds'] else 'no'}{', intervals overlap' if d['intervals_overlap'] else ''})"
                                     for b, d in v.items()))
        if "proact_inside_neuron_interval" in x:
            v = x["proact_inside_neuron_interval"]
            bad = [b for b, d in v.items() if not d["holds"]]
            parts.append("inside neuron-wise's interval: " + ("every BER" if not bad else "not at " + ", ".join(bad)))
        if "neuron_over_proact_thresholds" in x:
            parts.append(f"neuron-wise / ProAct thresholds: {x['neuron_over_proact_thresholds']:.1f}x")
        if "clean_drop_points" in x:
            parts.append(f"clean drop {x['clean_drop_points']:.2f} points ({x['clean_items']} items)")
        out.append(f"- {fm}: " + "; ".join(parts))
    return out


def table(res: dict) -> str:
    """One markdown table per fault model (a BER means a different thing in each)."""
    out = []
    for fm in sorted({r["fault_model"] for r in res["schemes"]}, key=lambda f: f != "operation"):
        rows = [r for r in res["schemes"] if r["fault_model"] == fm]
        bers = sorted({p["ber"] for r in rows for p in r["points"]})
        n = {b: sorted({p["items"] for r in rows for p in r["points"] if p["ber"] == b}) for b in bers}
        what = {"operation": "operation-wise faults", "variable": "variable-level weight faults"}.get(fm, fm)
        lines = [f"| scheme ({what}) | thresholds | bytes | train s | clean (all items) | "
                 + " | ".join(f"BER {b:g} ({'/'.join(map(str, n[b]))} items)" for b in bers) + " |",
                 "|" + "---|" * (5 + len(bers))]
        for r in rows:
            c = r.get("clip")
            at = {p["ber"]: p for p in r["points"]}
            cells = [f"{at[b]['accuracy']:.3f} [{at[b]['ci'][0]:.3f}, {at[b]['ci'][1]:.3f}]" if b in at else "-"
                     for b in bers]
            clip = [str(c["thresholds"]), str(c["bytes"]), f"{c['train_seconds']:.0f}"] if c else ["-"] * 3
            full = r.get("clean_full")
            clean = f"{full['accuracy']:.4f}" if full else f"{r['clean']:.3f} ({r['clean_items']} items)"
            lines.append(f"| {r['scheme']} | " + " | ".join(clip) + f" | {clean} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(results: list[dict], path: Path) -> Path:
    """One panel per model and fault model (a BER means a different thing in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(res, fm) for res in results
              for fm in sorted({r["fault_model"] for r in res["schemes"]}, key=lambda f: f != "operation")]
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.0 * rows), dpi=110, squeeze=False)
    for ax, (res, fm) in zip(axes.flat, panels):
        for r in res["schemes"]:
            if r["fault_model"] != fm:
                continue
            b = [p["ber"] for p in r["points"]]
            a = [p["accuracy"] for p in r["points"]]
            err = [[p["accuracy"] - p["ci"][0] for p in r["points"]], [p["ci"][1] - p["accuracy"] for p in r["points"]]]
            ax.errorbar(b, a, yerr=err, marker="o", capsize=3, label=r["scheme"], color=f"C{ORDER.index(r['scheme']) if r['scheme'] in ORDER else len(ORDER)}",
                        linewidth=2.5 if r["scheme"] == "proact" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("bit error rate (" + ("per operation bit" if fm == "operation" else
                                            "per stored weight bit, variable-level") + ")")
        ax.set_ylabel(f"top-1 ({res['trials']} trial, 95% Wilson CI)")
        ax.set_title(f"sample {res['model']}, {fm} faults")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, path)


def make_table(args) -> None:
    results = [collect(Path(args.work), m, args.trials, args.seed) for m in args.models]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = []
    for res in results:
        res["claims"] = claims(res)
        md += [f"**sample {res['model']}** ({res['trials']} trial(s), seed {res['seed']}; clean on the most items run)", "",
               table(res), "", *summary(res["claims"]), ""]
    atomic_write(out / "proact_table.json", json.dumps(results, indent=1) + "\n")
    atomic_write(out / "proact_table.md", "\n".join(md))
    plot(results, out / "accuracy_vs_ber.png")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="proact_work", help="where models and per-point results are kept")
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train")
    t.add_argument("model")
    t.add_argument("--methods", default="ranger,layer,neuron,hybrid,proact")
    t.add_argument("--train", default=None)
    t.add_argument("--train-limit", type=int, default=512)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--penalty", type=float, default=0.02)
    t.add_argument("--suffix", default="", help="scheme name suffix for a variant (e.g. other --epochs)")
    c = sub.add_parser("clean")
    c.add_argument("model")
    n = sub.add_parser("count")
    n.add_argument("models", nargs="+", help="sample names, or MODEL.onnx with MODEL.npz beside it")
    n.add_argument("--out", default=None, help="JSON file")
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--ber", required=True, help="comma-separated BERs")
    e.add_argument("--schemes", default=None, help="default: none and every trained scheme (variants when named)")
    e.add_argument("--fault-model", choices=["operation", "variable"], default="operation")
    e.add_argument("--hw", default=None, help="--fault-model variable: ws:RxC, os:RxC, is:RxC, gpu:… or equal")
    e.add_argument("--variables", default="weight", help="--fault-model variable: weight, activation, psum")
    e.add_argument("--limit", type=int, default=200, help="the first N test items")
    e.add_argument("--batch", type=int, default=100, help="items per batch (the seeds depend on it)")
    tb = sub.add_parser("table")
    tb.add_argument("models", nargs="+")
    tb.add_argument("--out", required=True)
    for p in (e, tb):
        p.add_argument("--trials", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"train": train, "eval": evaluate_schemes, "clean": clean, "count": count, "table": make_table}[args.stage](args)


if __name__ == "__main__":
    main()
