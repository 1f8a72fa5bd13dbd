"""Accuracy against BER: the campaign behind ``onnxft eval``.

For every trial and batch one random stream (``SeedSequence([seed, trial, batch])``) is used at
every BER, so the curve's points share their random numbers (common random numbers: differences
between BERs are not sampling noise) and any one trial can be re-run alone.

Top-1: fraction of items whose arg-max equals the label. SDC: fraction of items whose arg-max
differs from the fault-free arg-max of the same graph (needs no labels). Every item of a batch is
an independent trial, so a point's value is a proportion over ``items x trials`` outcomes; its 95%
interval is Wilson's.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..faults.sampling import Faults, sample_faults, site_tables
from ..passes.inject import SiteSelection, inject
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession, make_session
from .stats import wilson_interval

METRICS = ("top1", "sdc")


@dataclass
class Point:
    ber: float
    value: float
    ci: tuple[float, float]
    trials: int
    n: int
    faults_per_item: float


@dataclass
class EvalResult:
    model: str
    metric: str
    clean: float
    points: list[Point]
    seed: int
    data: str | None
    items: int
    provider: str
    sites: int
    batch: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [dict(asdict(p), ci=list(p.ci)) for p in self.points]
        return d


def campaign_graph(model: onnx.ModelProto, selection: SiteSelection | None = None, int_widths=(16, 32),
                   logging: bool = False) -> onnx.ModelProto:
    """The injection graph every campaign runs (eval, replay, bench, select): with the fault-free
    fast path (a batch without faults runs the original nodes) and constant weights read
    transposed for fault gathers (see docs/injection_performance.md). ``onnxft inject`` writes the
    plain graph instead."""
    return inject(model, selection, int_widths=int_widths, logging=logging, fault_free_path=True,
                  transposed_weights=True).model


def trial_rng(seed: int, trial: int, batch_index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(trial), int(batch_index)])))


def _outcome(metric: str, logits: np.ndarray, labels, clean_pred) -> np.ndarray:
    pred = np.argmax(logits.reshape(len(logits), -1), axis=1)
    if metric == "top1":
        return pred == labels
    return pred != clean_pred


def evaluate(model: onnx.ModelProto, data: Dataset, bers: list[float], trials: int = 3, seed: int = 0,
             metric: str = "top1", provider: str = "auto", batch: int = 64,
             selection: SiteSelection | None = None, int_widths=(16, 32), model_name: str = "model",
             progress: Callable | None = None, fault_log: str | Path | None = None,
             threads: int | None = None) -> EvalResult:
    """Measure ``metric`` at each BER (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "top1" and data.labels is None:
        raise ValueError("the data has no labels (array 'y'): use --metric sdc, or add labels")
    for b in bers:
        if not (isinstance(b, (int, float)) and 0.0 <= b <= 1.0) or math.isnan(b):
            raise ValueError(f"BER must be a number in [0, 1], got {b}")
    if trials < 1:
        raise ValueError("trials must be at least 1")
    sess = InjectionSession(campaign_graph(model, selection, int_widths, fault_log is not None), provider, threads,
                            level="basic")
    n_items = len(data)
    starts = list(range(0, n_items, batch))
    # "clean" is the user's model as it is; the injection graph's own fault-free predictions are
    # the SDC baseline (so that BER 0 gives exactly 0 SDC).
    original = make_session(model, provider, threads, level="basic") if data.labels is not None else None
    clean_preds, plans_per_batch, clean_ok, graph_ok = [], [], 0, 0
    for j, s in enumerate(starts):
        feeds = data.batch(s, s + batch)
        out, plans = sess.clean(feeds)
        pred = np.argmax(out[0].reshape(len(out[0]), -1), axis=1)
        clean_preds.append(pred)
        plans_per_batch.append(plans)
        if original is not None:
            ref = original.run(None, feeds)[0]
            labels = data.labels[s:s + batch]
            clean_ok += int(np.sum(np.argmax(ref.reshape(len(ref), -1), axis=1) == labels))
            graph_ok += int(np.sum(pred == labels))
    clean = clean_ok / n_items if metric == "top1" else 0.0
    counts = np.zeros(len(bers), np.int64)
    n_faults = np.zeros(len(bers), np.int64)
    log_file = open(fault_log, "w") if fault_log else None
    total = trials * len(starts) * len(bers)
    done = 0
    try:
        for t in range(trials):
            for j, s in enumerate(starts):
                feeds = data.batch(s, s + batch)
                labels = None if data.labels is None else data.labels[s:s + batch]
                for i, ber in enumerate(bers):
                    rng = trial_rng(seed, t, j)
                    faults = sample_faults(plans_per_batch[j], ber, rng) if ber > 0 else Faults.empty()
                    if log_file is not None:
                        out, logs = sess.run(feeds, faults, plans_per_batch[j], with_log=True)
                        rec = _log_record(sess, model_name, data, s, batch, ber, seed, t, j,
                                          faults, plans_per_batch[j], logs, out[0])
                        rec["int_widths"] = list(int_widths)
                        rec["selection"] = _selection_dict(selection)
                        log_file.write(json.dumps(rec) + "\n")
                    else:
                        out = sess.run(feeds, faults, plans_per_batch[j])
                    counts[i] += int(np.sum(_outcome(metric, out[0], labels, clean_preds[j])))
                    n_faults[i] += len(faults)
                    done += 1
                    if progress:
                        progress(done, total)
    finally:
        if log_file is not None:
            log_file.close()
    n = n_items * trials
    points = [Point(float(b), counts[i] / n, wilson_interval(int(counts[i]), n), trials, n,
                    float(n_faults[i]) / n) for i, b in enumerate(bers)]
    result = EvalResult(model_name, metric, clean, points, seed, data.path, n_items,
                        ",".join(sess.providers), len(sess.table.sites), batch)
    if original is not None:
        result.extra["clean_injection_graph"] = graph_ok / n_items
    return result


def _selection_dict(sel: SiteSelection | None) -> dict:
    if sel is None:
        return {}
    return {"op_types": sorted(sel.op_types) if sel.op_types else None, "names": sel.names,
            "formats": sorted(sel.formats) if sel.formats else None, "scales": [list(x) for x in sel.scales],
            "include_protection": sel.include_protection}


def output_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _log_record(sess, model_name, data, start, batch, ber, seed, trial, batch_index, faults, plans, logs, out):
    sites = sess.table.sites
    rows = []
    # The graph logs one row per faulted operation (several bits of one operation are merged).
    for idx in np.unique(faults.site):
        idx = int(idx)
        if sites[idx].path:  # inside control flow: no values logged; one row per faulted operation
            sel = faults.subset(faults.site == idx)
            ops: dict = {}
            for e, it, el, st, b in zip(sel.execution.tolist(), sel.item.tolist(), sel.element.tolist(),
                                        sel.step.tolist(), sel.bit.tolist()):
                ops.setdefault((e, it, el, st), []).append(b)
            rows += [{"site": sites[idx].id, "node": sites[idx].node, "execution": e, "item": it, "element": el,
                      "step": st, "bits": sorted(bits), "original": None, "faulty": None}
                     for (e, it, el, st), bits in sorted(ops.items())]
            continue
        _, (o, t, masks) = site_tables(plans[idx], faults, idx)  # rows in the graph's table order
        values = logs[sites[idx].log_output()]
        for r in range(len(o)):
            item, element = divmod(int(o[r]), plans[idx].elements)
            bits = [b for b in range(64) if (int(masks[r]) >> b) & 1]
            row = {"site": sites[idx].id, "node": sites[idx].node, "item": item, "element": element,
                   "step": int(t[r]), "bits": bits, "original": float(values[r, 0]), "faulty": float(values[r, 1])}
            if sites[idx].recovery_of:  # drawn for a full recompute; applied only where the run recomputed
                row["applied"] = bool(values[r, 2])
                if not row["applied"]:
                    row["original"] = row["faulty"] = None
            rows.append(row)
    return {"model": model_name, "data": data.path, "start": start, "stop": min(start + batch, len(data)),
            "ber": ber, "seed": seed, "trial": trial, "batch_index": batch_index,
            "faults": rows, "output_sha256": output_digest(out),
            "pred": np.argmax(out.reshape(len(out), -1), axis=1).tolist()}


def faults_from_record(record: dict, table) -> Faults:
    """Canonical faults of a logged trial (one row per flipped bit)."""
    index = {s.id: i for i, s in enumerate(table.sites)}
    cols = {k: [] for k in ("site", "item", "element", "step", "bit", "execution")}
    for row in record["faults"]:
        if row["site"] not in index:
            raise ValueError(f"logged site {row['site']} is not in this injection graph")
        for bit in row["bits"]:
            cols["site"].append(index[row["site"]])
            cols["item"].append(row["item"])
            cols["element"].append(row["element"])
            cols["step"].append(row["step"])
            cols["bit"].append(bit)
            cols["execution"].append(row.get("execution", 0))
    return Faults(*(np.asarray(cols[k], np.int64) for k in ("site", "item", "element", "step", "bit", "execution")))


def replay(model: onnx.ModelProto, data: Dataset, record: dict, provider: str = "cpu",
           selection: SiteSelection | None = None, int_widths=(16, 32)) -> dict:
    """Re-run one logged trial; report whether its output is bit-identical to the logged one."""
    sess = InjectionSession(campaign_graph(model, selection, int_widths), provider, level="basic")
    feeds = data.batch(record["start"], record["stop"])
    plans = sess.plans(feeds)
    faults = faults_from_record(record, sess.table)
    out = sess.run(feeds, faults, plans)[0]
    digest = output_digest(out)
    pred = np.argmax(out.reshape(len(out), -1), axis=1).tolist()
    return {"identical": digest == record["output_sha256"], "output_sha256": digest,
            "logged_sha256": record["output_sha256"], "pred": pred, "logged_pred": record["pred"],
            "faults": len(faults)}
