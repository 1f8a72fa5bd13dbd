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

from ..faults.sampling import Faults, sample_faults, site_tables
from ..passes.inject import SiteSelection, inject
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession, make_session
from .outcomes import Judge, OutcomeCounts, output_batch_axes
from .progress import report_phase
from .spec import FAULT_MODELS, METRICS, CampaignSpec
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
    check_fault_model(spec)


def check_fault_model(spec: CampaignSpec) -> None:
    """``fault_model``, ``hw`` and ``variables`` agree (one clear error otherwise)."""
    from ..faults.variable import VARIABLE_KINDS, parse_hw

    if spec.fault_model not in FAULT_MODELS:
        raise ValueError(f"unknown fault model {spec.fault_model!r}; choose from {', '.join(FAULT_MODELS)}")
    if spec.fault_model == "operation":
        if spec.hw is not None:
            raise ValueError("--hw needs --fault-model variable")
        if tuple(spec.variables) != VARIABLE_KINDS:
            raise ValueError("--variables needs --fault-model variable")
        return
    if spec.hw is None:
        raise ValueError("--fault-model variable needs --hw (ws:RxC, os:RxC, is:RxC, gpu:TMxTNxTK or equal)")
    parse_hw(spec.hw)
    bad = sorted(set(spec.variables) - set(VARIABLE_KINDS))
    if bad or not spec.variables:
        raise ValueError(f"--variables {','.join(spec.variables)}: choose from weight, activation, psum or all")
    if spec.int_widths[0] != 32:
        raise ValueError("--fault-model variable computes int8 operand faults on 32-bit products: "
                         "use --int-widths 32,ACC")


class EvalRunner:
    """Runs units of an eval campaign: one (trial, batch, BER) each, all items of that batch.

    Built once per worker from a payload ``{"model", "data", "spec"}`` (the model as a ModelProto
    or its serialised bytes, the Dataset, ``CampaignSpec.to_json()``); builds the injection session
    and each batch's fault-free outputs and site plans once. A unit's faults come from
    ``trial_rng(seed, trial, batch)`` whatever the BER (common random numbers) and whoever runs it,
    so results are the same for any worker count and schedule."""

    def __init__(self, payload: dict):
        model = payload["model"]
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        self.spec = spec = CampaignSpec.from_json(payload["spec"])
        self.data: Dataset = payload["data"]
        self.log = payload.get("fault_log")  # an open file (in-process campaigns only)
        progress = payload.get("progress")
        threads = payload.get("threads", spec.threads)
        report_phase(progress, "building the injection graph")
        self.sess = InjectionSession(campaign_graph(model, spec.selection, spec.int_widths, self.log is not None),
                                     spec.provider, threads, level="basic")
        self.starts = list(range(0, len(self.data), spec.batch))
        self._clean: dict[int, tuple] = {}
        for j in range(len(self.starts)):  # every batch's fault-free run before the first unit
            report_phase(progress, f"clean pass, batch {j + 1}/{len(self.starts)}")
            self.clean(j)
        out, _ = self.clean(0)
        axes = output_batch_axes(self.sess.outputs_any_shape, self.data, self.sess.output_names)
        self.judge = Judge(self.sess.output_names, out, spec.outcome, items=self.feeds(0).batch_size, axes=axes)
        self.variable = VariableFaults(model, spec) if spec.fault_model == "variable" else None

    def feeds(self, j: int):
        s = self.starts[j]
        return self.data.batch(s, s + self.spec.batch)

    def labels(self, j: int):
        s = self.starts[j]
        return self.data.labels_of(s, s + self.spec.batch)

    def clean(self, j: int) -> tuple[list, list]:
        """Fault-free outputs and site plans of batch ``j`` (computed once)."""
        if j not in self._clean:
            self._clean[j] = self.sess.clean(self.feeds(j))
        return self._clean[j]

    def run(self, unit) -> dict:
        spec, j = self.spec, unit.batch
        clean, plans = self.clean(j)
        feeds, labels = self.feeds(j), self.labels(j)
        rng = trial_rng(spec.seed, unit.trial, j)
        flips = None
        if unit.ber <= 0:
            faults = Faults.empty()
        elif self.variable is not None:
            faults, flips = self.variable.sample(j, feeds, plans, unit.ber, rng)
        else:
            faults = sample_faults(plans, unit.ber, rng, spec.max_faults)
        if self.log is not None:
            out, logs = self.sess.run(feeds, faults, plans, with_log=True)
        else:
            out = self.sess.run(feeds, faults, plans)
        codes = self.judge.classify(out, clean, labels)
        counts = OutcomeCounts()
        counts.add(codes)
        # faults: flipped bits (operation-wise: of operations; variable-level: of stored variables)
        result = {"masked": counts.masked, "sdc": counts.sdc, "due": counts.due,
                  "faults": len(faults) if flips is None else flips}
        if spec.metric == "top1":
            result["correct"] = int(np.sum(self.judge.correct(out, labels, clean)))
        if self.log is not None:
            s = self.starts[j]
            rec = _log_record(self.sess, spec.model or spec.model_name, self.data, s, spec.batch, unit.ber, spec.seed,
                              unit.trial, j, faults, plans, logs, out)
            rec["int_widths"] = list(spec.int_widths)
            rec["selection"] = _selection_dict(spec.selection)
            rec["outcomes"] = codes.tolist()  # per item: 0 masked, 1 SDC, 2 DUE
            self.log.write(json.dumps(rec) + "\n")
        return {"result": result, "faults": result["faults"]}


class VariableFaults:
    """``eval --fault-model variable``: faults of the variable-level model at a BER, per batch
    (``faults.variable.VariableSpace.sample_ber`` and ``inject``), as product faults for the
    campaign graph. Operands are read from the plain injection graph (same sites and table)."""

    def __init__(self, model: onnx.ModelProto, spec: CampaignSpec):
        from ..faults.variable import OperandReader, parse_hw

        self.spec, self.hw = spec, parse_hw(spec.hw)
        graph = inject(model, spec.selection, int_widths=spec.int_widths, transposed_weights=True).model
        self.reader = OperandReader(graph, spec.provider, spec.threads)
        self._space: tuple | None = None  # (batch index, VariableSpace with its fault-free operands)

    def space(self, j: int, feeds, plans):
        from ..faults.variable import VariableSpace

        if self._space is None or self._space[0] != j:  # units run batch by batch: keep one batch's operands
            sp = VariableSpace(plans, self.hw, self.reader, tuple(self.spec.variables))
            sp.prepare(feeds)
            self._space = (j, sp)
        return self._space[1]

    def sample(self, j: int, feeds, plans, ber: float, rng: np.random.Generator) -> tuple[Faults, int]:
        """(product faults to feed, stored-bit flips drawn)."""
        from ..faults.sampling import FaultBudgetError

        sp = self.space(j, feeds, plans)
        items = feeds.batch_size if hasattr(feeds, "batch_size") else max(p.items for p in plans)
        expected = sp.expected_faults(ber, items)
        if self.spec.max_faults is not None and expected > self.spec.max_faults:
            raise FaultBudgetError(f"BER {ber:g} means {expected:.3g} stored-bit flips per batch of {items}, over "
                                   f"the limit of {self.spec.max_faults:.3g} (--max-faults): lower the BER or --batch")
        drawn = sp.sample_ber(ber, items, rng)
        return sp.inject(drawn, feeds, plans), len(drawn)


def eval_units(spec: CampaignSpec, n_items: int) -> list:
    """The campaign's units in their canonical order: trial, batch, BER (as the fault log lists them)."""
    from .store import Unit

    batches = range(len(range(0, n_items, spec.batch)))
    return [Unit(spec.model_name, "none", float(ber), t, j) for t in range(spec.trials) for j in batches
            for ber in spec.bers]


def evaluate(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, progress: Callable | None = None,
             fault_log: str | Path | None = None, store=None, workers: int = 1,
             ray_address: str | None = None) -> EvalResult:
    """Measure ``spec.metric`` and the outcome rates at each of ``spec.bers`` (see the module docstring).

    The campaign is a set of units (``EvalRunner``): with ``store`` (a ``CampaignStore``) each is
    committed when done and a resumed campaign runs only the missing ones; with ``workers`` > 1 or
    ``ray_address`` they run on Ray workers (``campaigns.workers``). Results are the same either way.
    Uses spec fields bers, trials, seed, metric, outcome, selection, int_widths, provider, threads,
    batch, max_faults, model (fault log) and model_name (the result's label)."""
    from .workers import run_units, threads_per_worker

    check_spec(spec, data)
    if fault_log is not None and (workers > 1 or ray_address or (store is not None and store.resume)):
        raise ValueError("--fault-log needs the whole campaign in this process: drop --workers/--resume")
    bers, metric = list(spec.bers), spec.metric
    if store is not None:
        store.register(spec.model_name, "eval", spec.to_json())
    log_file = open(fault_log, "w") if fault_log else None
    try:
        runner = EvalRunner({"model": model, "data": data, "spec": spec.to_json(), "fault_log": log_file,
                             "progress": progress})
        clean, graph_ok = _clean_accuracy(model, data, spec, runner) if metric == "top1" else (0.0, None)
        units = eval_units(spec, len(data))
        if workers > 1 or ray_address:
            payload = {"model": model.SerializeToString(), "data": data, "spec": spec.to_json(),
                       "threads": threads_per_worker(workers, spec.threads)}
            results = run_units(units, EvalRunner, payload, store, workers, ray_address, progress)
        else:
            results = run_units(units, lambda _: runner, None, store, progress=progress)
    finally:
        if log_file is not None:
            log_file.close()
    n = len(data) * spec.trials
    points = []
    for b in bers:
        rows = [results[u.key] for u in units if u.ber == float(b)]
        counts = OutcomeCounts(*(sum(r[k] for r in rows) for k in ("masked", "sdc", "due")))
        value = sum(r["correct"] for r in rows) if metric == "top1" else counts.sdc
        flips = sum(r["faults"] for r in rows)
        rates = counts.rates()
        points.append(Point(float(b), value / n, wilson_interval(int(value), n), spec.trials, n, flips / n,
                            rates["sdc"], rates["due"], rates["masked"], tuple(rates["sdc_ci"]),
                            tuple(rates["due_ci"])))
    sess = runner.sess
    result = EvalResult(spec.model_name, metric, clean, points, spec.seed, data.path, len(data),
                        ",".join(sess.providers), len(sess.table.sites), spec.batch, runner.judge.describe(),
                        spec.to_json())
    if graph_ok is not None:
        result.extra["clean_injection_graph"] = graph_ok
    return result


def _clean_accuracy(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, runner: EvalRunner):
    """Top-1 of the user's model as it is ("clean") and of the injection graph at BER 0."""
    original = make_session(model, spec.provider, spec.threads, level="basic")
    clean_ok = graph_ok = 0
    for j in range(len(runner.starts)):
        feeds, labels = runner.feeds(j), runner.labels(j)
        out, _ = runner.clean(j)
        ref = original.run(runner.sess.output_names, feeds)
        clean_ok += int(np.sum(runner.judge.correct(ref, labels)))
        graph_ok += int(np.sum(runner.judge.correct(out, labels)))
    return clean_ok / len(data), graph_ok / len(data)


def _selection_dict(sel: SiteSelection | None) -> dict:
    if sel is None:
        return {}
    return {"op_types": sorted(sel.op_types) if sel.op_types else None, "names": sel.names,
            "formats": sorted(sel.formats) if sel.formats else None, "scales": [list(x) for x in sel.scales],
            "include_protection": sel.include_protection, "fault_constants": sel.fault_constants}


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
