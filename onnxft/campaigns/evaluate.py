"""Accuracy and outcome rates against BER: the campaign behind ``onnxft eval``.

For every trial and batch one random stream (``SeedSequence([seed, trial, batch])``) is used at
every BER, so the curve's points share their random numbers (common random numbers: differences
between BERs are not sampling noise) and any one trial can be re-run alone.

Every item of every faulty run is classified masked, SDC or DUE against the fault-free run of the
same injection graph (``campaigns.outcomes``; BER 0 gives exactly 0 SDC and 0 DUE). The point's
``value`` is the metric: top-1 accuracy against the labels (a DUE item is never correct), or the
SDC rate (``--metric sdc``, needs no labels). Every item of a batch is an independent trial, so
each rate is a proportion over ``items x trials`` outcomes; its 95% interval is Wilson's.
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

from ..faults.sampling import DEFAULT_MAX_FAULTS, Faults, sample_faults, site_tables
from ..passes.inject import SiteSelection, inject
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession, make_session
from .outcomes import SDC, Judge, OutcomeCounts, output_batch_axes
from .progress import report_phase
from .spec import METRICS, CampaignSpec
from .stats import wilson_interval


@dataclass
class Point:
    ber: float
    value: float
    ci: tuple[float, float]
    trials: int
    n: int
    faults_per_item: float
    sdc: float = 0.0
    due: float = 0.0
    masked: float = 1.0
    sdc_ci: tuple[float, float] = (0.0, 1.0)
    due_ci: tuple[float, float] = (0.0, 1.0)


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
    outputs: dict = field(default_factory=dict)  # checked and ignored outputs, the SDC criterion
    spec: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [dict(asdict(p), ci=list(p.ci), sdc_ci=list(p.sdc_ci), due_ci=list(p.due_ci))
                       for p in self.points]
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


def check_spec(spec: CampaignSpec, data: Dataset) -> None:
    if spec.metric not in METRICS:
        raise ValueError(f"unknown metric {spec.metric!r}; choose from {', '.join(METRICS)}")
    if spec.metric == "top1" and data.labels is None:
        raise ValueError("the data has no labels (array 'y'): use --metric sdc, or add labels")
    for b in spec.bers:
        if not (isinstance(b, (int, float)) and 0.0 <= b <= 1.0) or math.isnan(b):
            raise ValueError(f"BER must be a number in [0, 1], got {b}")
    if spec.trials < 1:
        raise ValueError("trials must be at least 1")
    if spec.batch < 1:
        raise ValueError("batch must be at least 1")
    spec.outcome.validate()


def evaluate(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, progress: Callable | None = None,
             fault_log: str | Path | None = None) -> EvalResult:
    """Measure ``spec.metric`` and the outcome rates at each of ``spec.bers`` (see the module docstring).

    Uses spec fields bers, trials, seed, metric, outcome, selection, int_widths, provider, threads,
    batch, model (fault log) and model_name (the result's label)."""
    check_spec(spec, data)
    bers, batch, metric = list(spec.bers), spec.batch, spec.metric
    report_phase(progress, "building the injection graph")
    sess = InjectionSession(campaign_graph(model, spec.selection, spec.int_widths, fault_log is not None),
                            spec.provider, spec.threads, level="basic")
    n_items = len(data)
    starts = list(range(0, n_items, batch))
    # "clean" is the user's model as it is; the injection graph's own fault-free outputs are the
    # outcome baseline (so that BER 0 gives exactly 0 SDC and 0 DUE).
    original = make_session(model, spec.provider, spec.threads, level="basic") if metric == "top1" else None
    clean_outs, plans_per_batch, clean_ok, graph_ok = [], [], 0, 0
    judge = None
    for j, s in enumerate(starts):
        report_phase(progress, f"clean pass, batch {j + 1}/{len(starts)}")
        feeds = data.batch(s, s + batch)
        out, plans = sess.clean(feeds)
        if judge is None:
            axes = output_batch_axes(lambda f: sess.clean(f)[0], data, sess.output_names)
            judge = Judge(sess.output_names, out, spec.outcome, items=feeds.batch_size, axes=axes)
        clean_outs.append(out)
        plans_per_batch.append(plans)
        if original is not None:
            labels = data.labels[s:s + batch]
            ref = original.run(sess.output_names, feeds)
            clean_ok += int(np.sum(judge.correct(ref, labels)))
            graph_ok += int(np.sum(judge.correct(out, labels)))
    clean = clean_ok / n_items if metric == "top1" else 0.0
    counts = np.zeros(len(bers), np.int64)
    outcomes = [OutcomeCounts() for _ in bers]
    n_faults = np.zeros(len(bers), np.int64)
    log_file = open(fault_log, "w") if fault_log else None
    total = spec.trials * len(starts) * len(bers)
    done = 0
    try:
        for t in range(spec.trials):
            for j, s in enumerate(starts):
                feeds = data.batch(s, s + batch)
                labels = None if data.labels is None else data.labels[s:s + batch]
                for i, ber in enumerate(bers):
                    rng = trial_rng(spec.seed, t, j)
                    faults = (sample_faults(plans_per_batch[j], ber, rng, spec.max_faults) if ber > 0
                              else Faults.empty())
                    if log_file is not None:
                        out, logs = sess.run(feeds, faults, plans_per_batch[j], with_log=True)
                    else:
                        out = sess.run(feeds, faults, plans_per_batch[j])
                    codes = judge.classify(out, clean_outs[j], labels)
                    outcomes[i].add(codes)
                    if metric == "top1":
                        counts[i] += int(np.sum(judge.correct(out, labels, clean_outs[j])))
                    else:
                        counts[i] += int(np.sum(codes == SDC))
                    if log_file is not None:
                        rec = _log_record(sess, spec.model or spec.model_name, data, s, batch, ber, spec.seed, t, j,
                                          faults, plans_per_batch[j], logs, out)
                        rec["int_widths"] = list(spec.int_widths)
                        rec["selection"] = _selection_dict(spec.selection)
                        rec["outcomes"] = codes.tolist()  # per item: 0 masked, 1 SDC, 2 DUE
                        log_file.write(json.dumps(rec) + "\n")
                    n_faults[i] += len(faults)
                    done += 1
                    if progress:
                        progress(done, total)
    finally:
        if log_file is not None:
            log_file.close()
    n = n_items * spec.trials
    points = []
    for i, b in enumerate(bers):
        r = outcomes[i].rates()
        points.append(Point(float(b), counts[i] / n, wilson_interval(int(counts[i]), n), spec.trials, n,
                            float(n_faults[i]) / n, r["sdc"], r["due"], r["masked"], tuple(r["sdc_ci"]),
                            tuple(r["due_ci"])))
    result = EvalResult(spec.model_name, metric, clean, points, spec.seed, data.path, n_items,
                        ",".join(sess.providers), len(sess.table.sites), batch, judge.describe(), spec.to_json())
    if original is not None:
        result.extra["clean_injection_graph"] = graph_ok / n_items
    return result


def _selection_dict(sel: SiteSelection | None) -> dict:
    if sel is None:
        return {}
    return {"op_types": sorted(sel.op_types) if sel.op_types else None, "names": sel.names,
            "formats": sorted(sel.formats) if sel.formats else None, "scales": [list(x) for x in sel.scales],
            "include_protection": sel.include_protection}


def output_digest(outs) -> str:
    """SHA-256 of an output array, or of every output of a run in order (a list)."""
    h = hashlib.sha256()
    for a in outs if isinstance(outs, (list, tuple)) else [outs]:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _predictions(outs) -> list[int]:
    """Arg-max per item of the first float output (for the fault log's eyes; outcomes are in "outcomes")."""
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    arr = next((np.asarray(a) for a in outs if np.issubdtype(np.asarray(a).dtype, np.floating) and np.ndim(a)),
               np.asarray(outs[0]))
    return np.argmax(arr.reshape(len(arr), -1), axis=1).tolist()


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
            "faults": rows, "output_sha256": output_digest(out), "pred": _predictions(out)}


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
    out = sess.run(feeds, faults, plans)
    digest = output_digest(out)
    pred = _predictions(out)
    return {"identical": digest == record["output_sha256"], "output_sha256": digest,
            "logged_sha256": record["output_sha256"], "pred": pred, "logged_pred": record["pred"],
            "faults": len(faults)}
