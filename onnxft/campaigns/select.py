"""Algorithm 1 of the seed paper: choose which GEMMs to protect with LB-ABFT.

Layers are ranked by vulnerability factor, the GEMMs of the most vulnerable layer by theirs, and
LB-ABFT is applied one GEMM at a time (block size from OptBlockSizeSelection at the BER), adding its
expected operations to the overhead and re-measuring accuracy, until accuracy is within the target
of the clean accuracy or no GEMM fits under the overhead cap. A GEMM that would push the overhead
over the cap is passed over and the search goes on with the next (cheaper) one, which is how the
paper's "optimise accuracy under the overhead limit" is carried out.

Measuring accuracy. Every step would need a new hardened graph, a new injection graph and a new
onnxruntime session (seconds to tens of seconds each). Instead the search measures "GEMM g
protected" as "the faults at g's sites removed" from the very same fault samples (common random
numbers, as ``onnxft vuln`` does): LB-ABFT recomputes every block whose checksum fires, so it
removes every fault large enough to be detected, and the undetected ones are below the rounding
threshold (docs/abft.md). The chosen protection is then built for real and evaluated under
injection once; the plan records both figures, so any gap between the estimate and the real graph
is visible.

Two departures from the paper, both measured on the tiny test model (tests/test_select.py): GEMMs
within a layer are ranked by vulnerability factor per unit of overhead, not by factor alone (by
factor alone Algorithm 1 protected fc2 where v/k do at 42% of the cost); and once the target is
reached, chosen GEMMs whose removal keeps the target are dropped again, most expensive first.
Layers are still ranked by vulnerability factor, as in the paper.

Overhead = expected LB-ABFT operations (detection + expected block detection and recovery at the
BER) of the chosen GEMMs, as a fraction of all the model's operations (every fault site's
operations per item), as in the paper's Figs. 10 and 12.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..analysis import grouping
from ..passes.abft import abft
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession
from .evaluate import campaign_graph
from .spec import CampaignSpec
from .vuln import Campaign, Component, VulnUnit, factor_run, measure


def check_select(spec: CampaignSpec) -> None:
    """Algorithm 1's options: spec.target_drop (accuracy may be at most this far below clean,
    absolute), spec.max_overhead (expected extra operations / the model's operations), trials <=
    max_trials, and its BER (``spec.algorithm_ber``) in (0, 1]."""
    if not 0 <= spec.target_drop < 1:
        raise ValueError(f"--target-drop must be in [0, 1), got {spec.target_drop}")
    if not spec.max_overhead >= 0 or math.isinf(spec.max_overhead):
        raise ValueError(f"--max-overhead must be a finite number >= 0, got {spec.max_overhead}")
    if spec.trials < 1 or spec.max_trials < spec.trials:
        raise ValueError("need 1 <= trials <= max trials")
    if not spec.bers and spec.design_ber is None or not 0 < spec.algorithm_ber <= 1:
        raise ValueError(f"--select auto needs a BER in (0, 1], got {spec.design_ber}")


@dataclass
class Unit:
    """One GEMM unit: its name, the fault sites it covers (the MatMul and its bias Add), its layer
    and its expected LB-ABFT cost per item."""

    name: str
    sites: frozenset
    layer: str
    block_size: int | None
    ops: float  # expected extra operations per item
    overhead: float  # ops / the model's operations per item


@dataclass
class Selection:
    ber: float
    clean: float
    target: float
    unprotected: float
    chosen: list[str]
    accuracy: float  # estimated by fault removal with the chosen GEMMs protected
    overhead: float
    reached: bool
    steps: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    passed_over: list[dict] = field(default_factory=list)
    block_sizes: dict = field(default_factory=dict)


def gemm_units(campaign: Campaign, model: onnx.ModelProto, ber: float) -> list[Unit]:
    """The protectable GEMM units of ``model`` with their sites in ``campaign``'s injection graph
    and their expected LB-ABFT cost at ``ber``."""
    table = campaign.table
    by_node = {s.node: i for i, s in enumerate(table.sites)}
    by_origin: dict[str, set] = {}  # a decomposed Gemm's MatMul, Mul and Add all come from the Gemm
    for i, s in enumerate(table.sites):
        by_origin.setdefault(s.origin_node, set()).add(i)
    ops_total = sum(p.operations_per_item for p in campaign.plans[0])
    layer_of = {}
    for g in grouping.layers(table, model):
        for i in g.sites:
            layer_of[i] = g.name
    plan = abft(model, "lb", ber).details["gemms"]
    units = []
    for e in plan:
        sites = ({by_node[e["name"]]} if e["name"] in by_node else set()) | by_origin.get(e["name"], set())
        if not sites:
            continue  # not a fault site in this injection graph (e.g. a format not selected)
        if e.get("bias") and e["bias"] in by_node:
            sites.add(by_node[e["bias"]])
        per_matrix = (e.get("ops_detection") or 0) + (e.get("ops_expected_recovery") or 0)
        ops = per_matrix * matrices_per_item(e)
        units.append(Unit(e["name"], frozenset(sites), layer_of.get(min(sites), "other"),
                          e.get("block_size"), float(ops), float(ops) / ops_total if ops_total else 0.0))
    return units


def matrices_per_item(entry: dict) -> int:
    """GEMM matrices one batch item computes: the leading dims of Y after the batch axis (heads of
    an attention product); a rank-2 product computes one matrix row per item."""
    if entry.get("rowwise"):
        return 1
    dims = list(entry.get("batch_dims") or [])[1:]
    return int(np.prod([d for d in dims if isinstance(d, int) and d > 0], dtype=np.int64)) if dims else 1


def accuracy_without(campaign: Campaign, ber: float, sites: frozenset, trials: int) -> float:
    """Accuracy at ``ber`` with every fault at ``sites`` removed (same seeds as every other call)."""
    ok, n = 0, 0
    protected = Component("protected", sites)
    for t in range(trials):
        for j in range(len(campaign.starts)):
            f = campaign.faults(t, j, ber, None)
            right = campaign._run(j, f.subset(~protected.removes(f)) if sites else f)
            ok += int(np.sum(right))
            n += len(right)
    return ok / n


class SelectSetup:
    """What the units of one Algorithm 1 campaign need, built the same way in the driver and in
    every worker: the injection ``Campaign`` of the model, its GEMM units and its layers."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, threads: int | None = None):
        sess = InjectionSession(campaign_graph(model), spec.provider, threads, level="basic")
        self.campaign = Campaign(sess, data, spec.batch, spec.seed, outcome=spec.outcome)
        self.units = gemm_units(self.campaign, model, spec.algorithm_ber)
        self.layer_sites = {g.name: frozenset(g.sites) for g in grouping.layers(self.campaign.table, model)}
        self.layer_names = list(dict.fromkeys(u.layer for u in self.units))

    def layer_components(self) -> list[Component]:
        return [Component(name, self.layer_sites.get(name, frozenset())) for name in self.layer_names]

    def gemm_components(self, layer: str) -> list[Component]:
        return [Component(u.name, u.sites) for u in self.units if u.layer == layer]

    def run(self, unit: VulnUnit) -> dict:
        """``select/layers``: factors of the layers; ``select/gemms:LAYER``: of that layer's GEMMs;
        ``select/without:DIGEST``: accuracy with the faults of the GEMMs ``unit.protect`` removed."""
        kind, _, arg = unit.scheme.partition("/")[2].partition(":")
        camp = self.campaign
        faults = camp.faults(unit.trial, unit.batch, unit.ber, None)
        if kind == "without":
            by_name = {u.name: u for u in self.units}
            sites = frozenset().union(*[by_name[n].sites for n in unit.protect])
            kept = faults.subset(~Component("protected", sites).removes(faults)) if sites else faults
            right = camp._run(unit.batch, kept)
            result = {"ok": int(right.sum()), "n": len(right)}
        else:
            comps = self.layer_components() if kind == "layers" else self.gemm_components(arg)
            result = measure(camp, unit.batch, faults, comps)
        return {"result": result, "faults": len(faults)}


class SelectRunner:
    """Runs Algorithm 1's units in a worker, from a payload ``{"model": bytes, "data": Dataset,
    "spec": CampaignSpec.to_json(), "threads": n}`` (``workers.UnitPool``)."""

    def __init__(self, payload: dict):
        spec = CampaignSpec.from_json(payload["spec"])
        self.setup = SelectSetup(onnx.load_from_string(payload["model"]), payload["data"], spec,
                                 payload.get("threads", spec.threads))

    def run(self, unit: VulnUnit) -> dict:
        return self.setup.run(unit)


def _accuracy_without(pool, name: str, n_batches: int, ber: float, gemms: list[str], trials: int) -> float:
    """``accuracy_without`` of the GEMMs ``gemms`` from the units ``select/without:DIGEST`` on ``pool``."""
    protect = tuple(sorted(gemms))
    digest = hashlib.sha256("\n".join(protect).encode()).hexdigest()[:16]
    units = [VulnUnit(name, f"select/without:{digest}", float(ber), t, j, protect) for t in range(trials)
             for j in range(n_batches)]
    results = pool.run(units)
    return sum(results[u.key]["ok"] for u in units) / sum(results[u.key]["n"] for u in units)


def register_selection(store, spec: CampaignSpec) -> None:
    """Record (or, resuming, check) Algorithm 1's part ``select:MODEL_NAME`` of ``store`` with its
    spec: a campaign that holds a selection (harden --select auto, compare's ``auto``) calls it
    before any of its work, so that a resume with other options stops at once."""
    store.register(f"select:{spec.model_name}", "select", spec.to_json())


def select_gemms(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec,
                 progress: Callable[[str], None] | None = None, store=None, workers: int = 1,
                 ray_address: str | None = None) -> Selection:
    """Algorithm 1 (see the module docstring) at ``spec.algorithm_ber`` (``design_ber``, else the
    largest of ``bers``), with spec fields target_drop, max_overhead, trials, max_trials, ci_width,
    batch, seed, provider, threads and outcome (which output is scored; DUE items are never correct).

    Its measurements are units (``vuln.VulnUnit``, part ``select``: layer factors, GEMM factors of
    a layer, accuracy with a set of GEMMs protected; x trial x batch) run on a ``workers.UnitPool``:
    ``store`` (a ``CampaignStore``) commits each one, and a resumed selection runs only the missing
    ones and takes the same steps (each is decided from unit results alone); ``workers`` > 1 or
    ``ray_address`` run them on Ray. ``progress(message)`` tells the steps."""
    from .workers import UnitPool, threads_per_worker

    check_select(spec)
    ber = spec.algorithm_ber
    if store is not None:
        register_selection(store, spec)
    setup = SelectSetup(model, data, spec, spec.threads)
    say = progress or (lambda _msg: None)
    if not setup.units:
        raise ValueError("the model has no protectable MatMul/Gemm")
    if workers > 1 or ray_address:
        payload = {"model": model.SerializeToString(), "data": data, "spec": spec.to_json(),
                   "threads": threads_per_worker(workers, spec.threads)}
        pool = UnitPool(SelectRunner, payload, store, workers, ray_address)
    else:
        pool = UnitPool(lambda _: setup, None, store)
    with pool:
        return _select(pool, setup, spec, ber, say)


def _select(pool, setup: SelectSetup, spec: CampaignSpec, ber: float, say) -> Selection:
    name, n_batches, units = spec.model_name, len(setup.campaign.starts), setup.units
    clean = setup.campaign.clean
    target = clean - spec.target_drop
    kw = dict(trials=spec.trials, max_trials=spec.max_trials, ci_width=spec.ci_width)

    say(f"layer vulnerability of {len(setup.layer_names)} layers at BER {ber:g}")
    lv = factor_run(pool, name, "select", n_batches, ber, setup.layer_components(), kind="layers", **kw)
    unprotected = lv.accuracy
    ranked_layers = sorted(lv.factors, key=lambda f: -f.factor)
    sel = Selection(ber, clean, target, unprotected, [], unprotected, 0.0, unprotected >= target,
                    layers=[{"layer": f.name, "factor": f.factor, "ci": list(f.ci)} for f in ranked_layers])
    # same trial count as the vulnerability runs, so the accuracies are comparable
    trials = lv.trials
    for lf in ranked_layers:
        if sel.reached:
            break
        in_layer = [u for u in units if u.layer == lf.name]
        if not in_layer:
            continue
        say(f"GEMM vulnerability in {lf.name} ({len(in_layer)} GEMMs)")
        mv = factor_run(pool, name, "select", n_batches, ber, setup.gemm_components(lf.name),
                        kind=f"gemms:{lf.name}", **kw)
        factor = {f.name: f for f in mv.factors}
        # vulnerability per unit of overhead (the paper ranks by vulnerability alone; see the docstring)
        for u in sorted(in_layer, key=lambda u: -factor[u.name].factor / max(u.overhead, 1e-12)):
            if sel.overhead + u.overhead > spec.max_overhead:
                sel.passed_over.append({"gemm": u.name, "layer": u.layer, "overhead": u.overhead,
                                        "reason": "would exceed the overhead cap"})
                continue
            sel.chosen.append(u.name)
            sel.block_sizes[u.name] = u.block_size
            sel.overhead += u.overhead
            sel.accuracy = _accuracy_without(pool, name, n_batches, ber, sel.chosen, trials)
            sel.steps.append({"gemm": u.name, "layer": u.layer, "factor": factor[u.name].factor,
                              "block_size": u.block_size, "overhead": sel.overhead, "accuracy": sel.accuracy})
            say(f"  + {u.name}: accuracy {sel.accuracy:.4f}, overhead {100 * sel.overhead:.3f}%")
            if sel.accuracy >= target:
                sel.reached = True
                break
    if sel.reached and len(sel.chosen) > 1:
        _prune(pool, name, n_batches, ber, units, sel, trials, say)
    return sel


def _prune(pool, name: str, n_batches: int, ber: float, units: list[Unit], sel: Selection, trials: int,
           say) -> None:
    """Drop chosen GEMMs, most expensive first, whose protection the target does not need."""
    by_name = {u.name: u for u in units}
    for gemm in sorted(sel.chosen, key=lambda n: -by_name[n].overhead):
        rest = [c for c in sel.chosen if c != gemm]
        acc = _accuracy_without(pool, name, n_batches, ber, rest, trials)
        if acc >= sel.target:
            sel.chosen = rest
            sel.block_sizes.pop(gemm, None)
            sel.overhead -= by_name[gemm].overhead
            sel.accuracy = acc
            sel.steps.append({"gemm": gemm, "dropped": True, "overhead": sel.overhead, "accuracy": acc})
            say(f"  - {gemm}: not needed (accuracy {acc:.4f} without it)")
