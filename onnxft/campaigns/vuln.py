"""Vulnerability factors: the campaign behind ``onnxft vuln`` (seed paper, Sec. on vulnerability).

The vulnerability factor of a component C (a layer, a module, an op type, an input patch, a bit
position) at a BER is

    VF(C) = accuracy with C perfectly protected (fault-free)  -  accuracy with nothing protected.

Common random numbers: for every (trial, batch) the faults are sampled ONCE, for the unprotected
model (``trial_rng(seed, trial, batch)``, the stream ``eval`` uses). The variant with C protected
runs the same fault set with C's faults filtered out. That has exactly the distribution of
sampling with C's BER scale at 0 (faults at different sites, items and bits are independent), and
the difference between the two runs of one item is caused by C's faults alone, so factors of
different components are compared without sampling noise between them.

Statistics: every item of every trial is an independent paired observation ``d = protected_ok -
unprotected_ok`` in {-1, 0, 1}. VF is the mean of ``d``; its 95% interval is the normal
approximation ``mean +- 1.96 sd(d) / sqrt(n)``. When no pair is discordant (``d`` is 0 for every
item) that interval would have width 0, so the rule of three is used instead: ``+-3/n``.
Trials are added (``trials`` at least, ``max_trials`` at most) until every factor's half-width is
at most ``ci_width``.

BER search (``target_loss``): the BER at which accuracy = clean x (1 - loss) (relative loss, the
default) or clean - loss (absolute), found by bisection in log10(BER) with the same seeds at every
BER (accuracy then falls almost monotonically with BER, as in ``eval``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import onnx

from ..analysis import grouping
from ..faults.sampling import Faults, SitePlan, sample_faults
from ..faults.sites import SiteTable
from ..passes.inject import SiteSelection, inject, prepare
from ..passes.input_sites import add_input_sites
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession
from .evaluate import trial_rng
from .outcomes import Judge, OutcomeOptions, output_batch_axes
from .spec import CampaignSpec
from .store import Unit
from .stats import wilson_interval

GRANULARITIES = ("model", "layer", "module", "optype", "patch", "bit")
LOSS_MODES = ("relative", "absolute")
_Z = 1.959963984540054


@dataclass
class Component:
    """A set of faults that protection removes: faults at ``sites`` (all sites if empty), and
    among those only faults at output ``elements`` (per item) and/or at bit ``bit``."""

    name: str
    sites: frozenset = frozenset()
    elements: np.ndarray | None = None
    bit: int | None = None
    share: float = 0.0  # the component's share of the operations (or input elements) at risk
    info: dict = field(default_factory=dict)  # e.g. a patch's row and column

    def removes(self, f: Faults) -> np.ndarray:
        mask = np.ones(len(f), bool)
        if self.sites:
            mask &= np.isin(f.site, np.fromiter(self.sites, np.int64))
        if self.elements is not None:
            mask &= np.isin(f.element, self.elements)
        if self.bit is not None:
            mask &= f.bit == self.bit
        return mask


@dataclass
class Factor:
    name: str
    factor: float
    ci: tuple[float, float]
    n: int
    gained: int  # items right with C protected, wrong without
    lost: int  # items wrong with C protected, right without
    sites: int
    share: float
    faults_share: float  # fraction of the sampled faults that fell in C
    info: dict = field(default_factory=dict)

    @property
    def half_width(self) -> float:
        return (self.ci[1] - self.ci[0]) / 2


@dataclass
class FactorRun:
    """Factors of several components at one BER, from one set of shared fault samples."""

    ber: float
    accuracy: float  # unprotected
    accuracy_ci: tuple[float, float]
    trials: int
    n: int
    faults_per_item: float
    factors: list[Factor]
    runs: int  # injection-graph runs it took
    due: float = 0.0  # unprotected: items with a NaN/Inf in a checked output (never correct)
    due_ci: tuple[float, float] = (0.0, 1.0)


def paired_interval(gained: int, lost: int, n: int) -> tuple[float, float]:
    """95% interval of the mean paired difference (see the module docstring)."""
    mean = (gained - lost) / n
    if gained + lost == 0:
        half = 3.0 / n
    else:
        var = max((gained + lost) / n - mean * mean, 0.0)
        half = _Z * math.sqrt(var / n)
    return (mean - half, mean + half)


def scaled_plans(plans: list[SitePlan], scales: dict[int, float] | None) -> list[SitePlan]:
    """Plans whose sites' BER scales are overridden (site index -> scale)."""
    if not scales:
        return plans
    return [replace(p, site=replace(p.site, scale=scales[i])) if i in scales else p for i, p in enumerate(plans)]


class Campaign:
    """An injection session over a dataset, with its per-batch plans: what every measurement of
    one model shares (built once; sessions are reused across BERs and components)."""

    def __init__(self, sess: InjectionSession, data: Dataset, batch: int = 250, seed: int = 0,
                 progress: Callable[[int], None] | None = None, outcome: OutcomeOptions | None = None):
        if data.labels is None:
            raise ValueError("vulnerability needs labelled data (an array 'y' in the .npz)")
        self.sess, self.data, self.batch, self.seed = sess, data, int(batch), int(seed)
        self.starts = list(range(0, len(data), self.batch))
        self.plans, self.clean_outs, self.clean_ok = [], [], 0
        self.judge = None  # which output is scored; a DUE item (NaN/Inf) is never correct
        for s in self.starts:
            feeds = data.batch(s, s + self.batch)
            out, plans = sess.clean(feeds)
            if self.judge is None:
                axes = output_batch_axes(sess.outputs_any_shape, data, sess.output_names)
                self.judge = Judge(sess.output_names, out, outcome, items=feeds.batch_size, axes=axes)
            self.plans.append(plans)
            self.clean_outs.append(out)
            self.clean_ok += int(np.sum(self.judge.correct(out, data.labels[s:s + self.batch])))
        self.runs = 0
        self.progress = progress  # called with the number of runs so far

    @property
    def table(self) -> SiteTable:
        return self.sess.table

    @property
    def clean(self) -> float:
        return self.clean_ok / len(self.data)

    def run_outcomes(self, j: int, faults: Faults) -> tuple[np.ndarray, np.ndarray]:
        """(correct, DUE) per item of batch ``j`` under ``faults``."""
        s = self.starts[j]
        self._count()
        out = self.sess.run(self.data.batch(s, s + self.batch), faults, self.plans[j])
        labels = self.data.labels[s:s + self.batch]
        due = self.judge.due(out, self.clean_outs[j])
        return (self.judge.predictions(out) == labels) & ~due, due

    def _run(self, j: int, faults: Faults) -> np.ndarray:
        return self.run_outcomes(j, faults)[0]

    def run_changed(self, j: int, faults: Faults, removed: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Correctness with ``faults[~removed]``. Only items that lost a fault can change, so only
        they are run, in a smaller batch (padded to a power of two, so that few batch shapes, and
        sessions, are made); the rest keep their ``base`` outcome. Items are independent in an
        inference batch, so this equals a full run up to the last-bit rounding differences of
        ONNX Runtime's kernels between batch sizes."""
        changed = np.unique(faults.item[removed])
        kept = faults.subset(~removed)
        size = max(16, 1 << int(len(changed) - 1).bit_length())
        n_batch = len(base)
        if size * 2 > n_batch or any(p.items == 1 for p in self.plans[j]) and n_batch > 1:
            return self._run(j, kept)
        s = self.starts[j]
        rows = np.concatenate([changed, np.full(size - len(changed), changed[0])])
        feeds = self.data.take(s + rows)
        sel = np.isin(kept.item, changed)
        sub = kept.subset(sel)
        sub.item = np.searchsorted(changed, sub.item)
        self._count()
        out = self.sess.run(feeds, sub, self.sess.plans(feeds))
        checked = set(self.judge.checked)
        out = [o[:len(changed)] if k in checked else o for k, o in enumerate(out)]
        clean = [c[changed] if k in checked else c for k, c in enumerate(self.clean_outs[j])]
        ok = base.copy()
        ok[changed] = self.judge.correct(out, self.data.labels[s + changed], clean)
        return ok

    def _count(self):
        self.runs += 1
        if self.progress:
            self.progress(self.runs)

    def faults(self, trial: int, j: int, ber: float, scales: dict[int, float] | None) -> Faults:
        if ber <= 0:
            return Faults.empty()
        return sample_faults(scaled_plans(self.plans[j], scales), ber, trial_rng(self.seed, trial, j))

    def accuracy(self, ber: float, trials: int = 1, scales: dict[int, float] | None = None) -> float:
        """Unprotected accuracy at ``ber`` (same seeds at every BER: common random numbers)."""
        ok = 0
        for t in range(trials):
            for j in range(len(self.starts)):
                ok += int(np.sum(self._run(j, self.faults(t, j, ber, scales))))
        return ok / (len(self.data) * trials)

    def operations_share(self, sites: Iterable[int], among: Iterable[int]) -> float:
        ops = [p.operations_per_item for p in self.plans[0]]
        total = sum(ops[i] for i in among)
        return sum(ops[i] for i in sites) / total if total else 0.0


@dataclass(frozen=True)
class VulnUnit(Unit):
    """A unit of a vulnerability campaign (vuln, Algorithm 1): one (trial, batch) at one BER of one
    *part*, ``scheme`` = ``PART/KIND``. The part says which sites are faulted (vuln's ``network`` or
    ``input``; Algorithm 1's ``select``) and which components are measured; ``KIND`` is
    ``factors`` (every component of the part), ``search`` (the unprotected accuracy alone, for the
    BER search) or a kind of Algorithm 1's (``campaigns.select``). ``protect``: GEMM names, for the
    units of Algorithm 1 that need them (their digest is in ``scheme``, so in the key)."""

    protect: tuple = ()


def measure(campaign: Campaign, j: int, faults: Faults, components: list[Component]) -> dict:
    """The result of one unit: batch ``j`` of ``campaign`` under ``faults`` unprotected (items right,
    DUE) and, for each component, the items it gains and loses with its faults removed, and how
    many of the faults fell in it. Integer counts, so sums over units do not depend on their order."""
    runs0 = campaign.runs
    base, base_due = campaign.run_outcomes(j, faults)
    gained, lost, inside = [], [], []
    for comp in components:
        removed = comp.removes(faults)
        count = int(removed.sum())
        inside.append(count)
        if count == 0:  # the same fault set: the same outputs
            gained.append(0)
            lost.append(0)
            continue
        prot = campaign.run_changed(j, faults, removed, base)
        gained.append(int(np.sum(prot & ~base)))
        lost.append(int(np.sum(~prot & base)))
    return {"ok": int(base.sum()), "due": int(base_due.sum()), "n": len(base), "faults": len(faults),
            "gained": gained, "lost": lost, "inside": inside, "runs": campaign.runs - runs0}


class LocalRunner:
    """Runs ``VulnUnit``s on a ``Campaign`` of this process: ``parts`` maps a unit's part to its
    fault scales (site index -> BER scale, or None) and components."""

    def __init__(self, campaign: Campaign, parts: dict[str, tuple]):
        self.campaign, self.parts = campaign, parts

    def run(self, unit: VulnUnit) -> dict:
        part, _, kind = unit.scheme.partition("/")
        scales, comps = self.parts[part]
        faults = self.campaign.faults(unit.trial, unit.batch, unit.ber, scales)
        result = measure(self.campaign, unit.batch, faults, comps if kind == "factors" else [])
        return {"result": result, "faults": len(faults)}


def factor_run(pool, model_name: str, part: str, n_batches: int, ber: float, components: list[Component],
               trials: int = 2, max_trials: int = 10, ci_width: float = 0.02, kind: str = "factors") -> FactorRun:
    """Factors of ``components`` at ``ber`` from the units ``PART/KIND`` run on ``pool``
    (``workers.UnitPool``), trial by trial: the first ``trials`` trials in one round, then one trial
    a round until every factor's 95% half-width is at most ``ci_width`` or ``max_trials`` are done.
    Every decision is a function of the results of the units done, so a resumed campaign makes the
    same ones and runs the same units."""
    if trials < 1 or max_trials < trials:
        raise ValueError("need 1 <= trials <= max_trials")
    k = len(components)
    gained, lost, inside = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
    ok_u = n = due = n_faults = runs = 0
    t = 0
    while True:
        rounds = range(t, max(trials, t + 1))
        units = [VulnUnit(model_name, f"{part}/{kind}", float(ber), tt, j) for tt in rounds
                 for j in range(n_batches)]
        results = pool.run(units)
        for u in units:
            r = results[u.key]
            ok_u, due, n, n_faults, runs = (ok_u + r["ok"], due + r["due"], n + r["n"], n_faults + r["faults"],
                                            runs + r["runs"])
            gained += np.asarray(r["gained"], np.int64).reshape(k)
            lost += np.asarray(r["lost"], np.int64).reshape(k)
            inside += np.asarray(r["inside"], np.int64).reshape(k)
        t = rounds[-1] + 1
        widths = [(paired_interval(int(g), int(l), n)[1] - paired_interval(int(g), int(l), n)[0]) / 2
                  for g, l in zip(gained, lost)]
        if t >= max_trials or (t >= trials and max(widths, default=0.0) <= ci_width):
            break
    factors = []
    for c, comp in enumerate(components):
        g, l = int(gained[c]), int(lost[c])
        factors.append(Factor(comp.name, (g - l) / n, paired_interval(g, l, n), n, g, l, len(comp.sites),
                              comp.share, float(inside[c]) / n_faults if n_faults else 0.0, dict(comp.info)))
    return FactorRun(float(ber), ok_u / n, wilson_interval(ok_u, n), t, n, n_faults / n, factors, runs, due / n,
                     wilson_interval(due, n))


def search_accuracy(pool, model_name: str, part: str, n_batches: int, ber: float, trials: int) -> float:
    """Unprotected accuracy at ``ber`` from the units ``PART/search`` (trials x batches) on ``pool``."""
    units = [VulnUnit(model_name, f"{part}/search", float(ber), t, j) for t in range(trials) for j in range(n_batches)]
    results = pool.run(units)
    return sum(results[u.key]["ok"] for u in units) / sum(results[u.key]["n"] for u in units)


def vulnerability_factors(campaign: Campaign, ber: float, components: list[Component], trials: int = 2,
                          max_trials: int = 10, ci_width: float = 0.02,
                          scales: dict[int, float] | None = None) -> FactorRun:
    """Each component's vulnerability factor at ``ber`` with a paired 95% interval, using common
    random numbers (see the module docstring), in this process. ``scales`` overrides sites' BER
    scales for the unprotected model (e.g. input faults only). ``analyse`` and Algorithm 1 run the
    same units through ``factor_run``, with a store and workers."""
    from .workers import UnitPool

    with UnitPool(lambda _: LocalRunner(campaign, {"part": (scales, components)}), None) as pool:
        return factor_run(pool, "model", "part", len(campaign.starts), ber, components, trials, max_trials,
                          ci_width)


def search_ber(accuracy: Callable[[float], float], target: float, start: float = 1e-12, stop: float = 1e-1,
               iters: int = 7, cache: dict | None = None) -> tuple[float, dict]:
    """The BER where ``accuracy(ber)`` crosses ``target``: step up by decades from ``start`` until
    the accuracy is at or below the target, then bisect that decade in log10(BER) ``iters`` times
    (a factor 10**(1/2**iters): 1.8% for 7). Returns (ber, {ber: accuracy} of every evaluation).

    ``accuracy`` should use common random numbers (the same seeds at every BER), so that it falls
    almost monotonically; ``cache`` shares evaluations between several targets."""
    cache = {} if cache is None else cache

    def acc(b):
        if b not in cache:
            cache[b] = float(accuracy(b))
        return cache[b]

    lo_e = math.log10(start)
    if acc(10 ** lo_e) <= target:
        raise ValueError(f"accuracy is already at or below the target {target:.4f} at BER {start:g}")
    hi_e = lo_e
    while acc(10 ** hi_e) > target:
        lo_e = hi_e
        hi_e += 1
        if 10 ** hi_e > stop * 1.0001:
            raise ValueError(f"accuracy stays above the target {target:.4f} up to BER {stop:g}")
    for _ in range(iters):
        mid = (lo_e + hi_e) / 2
        if acc(10 ** mid) > target:
            lo_e = mid
        else:
            hi_e = mid
    return 10 ** ((lo_e + hi_e) / 2), cache


def target_accuracy(clean: float, loss: float, mode: str = "relative") -> float:
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose from {', '.join(LOSS_MODES)}")
    if not 0 < loss < 1:
        raise ValueError(f"target loss must be in (0, 1), got {loss}")
    return clean * (1 - loss) if mode == "relative" else clean - loss


# ----- components of each granularity -------------------------------------------------------------

def site_components(campaign: Campaign, groups: list[grouping.Group]) -> list[Component]:
    among = grouping.network_sites(campaign.table)
    return [Component(g.name, frozenset(g.sites), share=campaign.operations_share(g.sites, among))
            for g in groups]


def bit_components(campaign: Campaign) -> list[Component]:
    sites = grouping.network_sites(campaign.table)
    width = max(max(s.widths.values()) for s in campaign.table.sites)
    return [Component(f"bit {b}", frozenset(sites), bit=b, share=1.0 / width, info={"bit": b})
            for b in range(width)]


def patch_size(model: onnx.ModelProto, image: tuple[int, int]) -> tuple[int, int]:
    """The ViT patch size: the kernel of a Conv on the graph input whose stride equals its kernel.
    Otherwise a ViT-like grid: 16 px patches (ViT-B/16), or a 7 x 7 grid below 112 px."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name for i in g.input if i.name not in inits}
    for node in g.node:
        if node.op_type != "Conv" or node.input[0] not in inputs and not node.input[0].startswith("onnxft.input/"):
            continue
        w = inits.get(node.input[1])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", list(w.dims[2:]) if w is not None else []))
        if len(kernel) == 2 and list(attrs.get("strides", [1, 1])) == kernel:
            return int(kernel[0]), int(kernel[1])
    h, w = image
    if min(h, w) >= 112:
        return 16, 16
    return max(1, math.ceil(h / 7)), max(1, math.ceil(w / 7))


def patch_components(campaign: Campaign, model: onnx.ModelProto, size: tuple[int, int] | None = None
                     ) -> tuple[list[Component], dict]:
    """One component per patch of the image input (its input site's elements in that patch)."""
    idx = grouping.input_sites(campaign.table)
    shapes = [campaign.plans[0][i].out_shape for i in idx]
    images = [(i, s) for i, s in zip(idx, shapes) if len(s) == 4]
    if len(images) != 1:
        raise ValueError("patch analysis needs exactly one image input (rank 4, NCHW or NHWC)")
    site, shape = images[0]
    _, d1, d2, d3 = shape
    nhwc = d3 <= 4 < d1
    c, h, w = (d3, d1, d2) if nhwc else (d1, d2, d3)
    ph, pw = size or patch_size(model, (h, w))
    rows, cols = math.ceil(h / ph), math.ceil(w / pw)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    comps = []
    for r in range(rows):
        for q in range(cols):
            inside = (hh // ph == r) & (ww // pw == q)
            pix = np.flatnonzero(inside.reshape(-1))
            if nhwc:
                elems = (pix[:, None] * c + np.arange(c)[None, :]).reshape(-1)
            else:
                elems = (np.arange(c)[:, None] * (h * w) + pix[None, :]).reshape(-1)
            comps.append(Component(f"patch {r},{q}", frozenset({site}), elements=np.sort(elems),
                                   share=len(elems) / (c * h * w), info={"row": r, "col": q}))
    grid = {"rows": rows, "cols": cols, "patch": [ph, pw], "image": [h, w], "channels": c,
            "layout": "NHWC" if nhwc else "NCHW", "input_site": campaign.table.sites[site].node}
    return comps, grid


# ----- the whole analysis -----------------------------------------------------------------------------

@dataclass
class VulnResult:
    model: str
    granularities: list[str]
    clean: float
    items: int
    batch: int
    seed: int
    sites: int
    loss_mode: str
    runs: list[dict] = field(default_factory=list)  # one per (part, BER): factors of components
    searches: list[dict] = field(default_factory=list)  # one per part: targets and evaluated points
    patch_grid: dict | None = None
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)  # the scored output, ignored outputs
    spec: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _run_dict(part: str, run: FactorRun, target_loss, groups: dict[str, list[str]]) -> dict:
    d = {"part": part, "ber": run.ber, "target_loss": target_loss, "accuracy": run.accuracy,
         "accuracy_ci": list(run.accuracy_ci), "due": run.due, "due_ci": list(run.due_ci),
         "trials": run.trials, "n": run.n,
         "faults_per_item": run.faults_per_item, "runs": run.runs, "factors": []}
    for f in run.factors:
        fd = {k: v for k, v in asdict(f).items()}
        fd["ci"] = list(f.ci)
        fd["granularity"] = next(g for g, names in groups.items() if f.name in names)
        d["factors"].append(fd)
    return d


def check_vuln(spec: CampaignSpec) -> None:
    """The options of ``analyse``: known granularities, one BER or target losses, trial counts."""
    grans = list(dict.fromkeys(spec.granularity))
    bad = [g for g in grans if g not in GRANULARITIES]
    if bad or not grans:
        raise ValueError(f"unknown granularity {', '.join(bad) or '(none)'}; choose from {', '.join(GRANULARITIES)}")
    if len(spec.bers) > 1:
        raise ValueError("vuln measures at one BER (or give target losses)")
    if (not spec.bers) == (not spec.target_losses):
        raise ValueError("give either a BER (--ber) or target losses (--target-loss)")
    if spec.bers and not 0 < float(spec.bers[0]) <= 1:
        raise ValueError(f"BER must be in (0, 1], got {spec.bers[0]}")
    for x in spec.target_losses:
        target_accuracy(1.0, float(x), spec.loss_mode)
    if spec.trials < 1 or spec.max_trials < spec.trials:
        raise ValueError("need 1 <= trials <= max_trials")


class VulnSetup:
    """What the units of one ``onnxft vuln`` campaign need, built the same way in the driver and in
    every worker: the injection ``Campaign`` (input sites added for ``patch``) and the *parts*,
    ``network`` (every network granularity's components, input sites at BER scale 0) and ``input``
    (one component per patch, every network site at scale 0): name -> (scales, components, the
    component names of each granularity)."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, threads: int | None = None,
                 progress=None):
        from .progress import report_phase

        grans = list(dict.fromkeys(spec.granularity))
        report_phase(progress, "building the injection graph")
        prepared = prepare(model)
        if "patch" in grans:
            prepared = add_input_sites(prepared).model
        inj = inject(prepared, SiteSelection(fault_constants=spec.selection.fault_constants), prepared=True)
        report_phase(progress, "clean pass")
        self.campaign = camp = Campaign(InjectionSession(inj.model, spec.provider, threads, level="basic"), data,
                                        spec.batch, spec.seed, outcome=spec.outcome)
        table = camp.table
        net, inp = grouping.network_sites(table), grouping.input_sites(table)
        self.network_sites = net
        self.parts: dict[str, tuple] = {}
        self.patch_grid = None
        net_comps, groups = [], {}
        builders = {"layer": lambda: site_components(camp, grouping.layers(table, prepared)),
                    "module": lambda: site_components(camp, grouping.modules(table)),
                    "optype": lambda: site_components(camp, grouping.op_types(table)),
                    "bit": lambda: bit_components(camp)}
        for g in grans:
            if g in builders:
                comps = builders[g]()
                for c in comps:
                    c.name = f"{g}:{c.name}" if any(c.name == o.name for o in net_comps) else c.name
                groups[g] = [c.name for c in comps]
                net_comps += comps
        if net_comps or "model" in grans:
            self.parts["network"] = ({i: 0.0 for i in inp}, net_comps, groups)
        if "patch" in grans:
            comps, self.patch_grid = patch_components(camp, prepared, spec.patch)
            self.parts["input"] = ({i: 0.0 for i in net}, comps, {"patch": [c.name for c in comps]})

    def runner(self) -> LocalRunner:
        return LocalRunner(self.campaign, {p: (scales, comps) for p, (scales, comps, _) in self.parts.items()})


class VulnRunner:
    """Runs vuln units in a worker, from a payload ``{"model": bytes, "data": Dataset, "spec":
    CampaignSpec.to_json(), "threads": n}`` (``workers.UnitPool``)."""

    def __init__(self, payload: dict):
        spec = CampaignSpec.from_json(payload["spec"])
        setup = VulnSetup(onnx.load_from_string(payload["model"]), payload["data"], spec,
                          payload.get("threads", spec.threads))
        self.local = setup.runner()

    def run(self, unit: VulnUnit) -> dict:
        return self.local.run(unit)


def analyse(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, progress: Callable | None = None,
            store=None, workers: int = 1, ray_address: str | None = None) -> VulnResult:
    """The whole ``onnxft vuln`` analysis (see the module docstring and docs/vulnerability.md).

    Spec fields: granularity; either one BER in ``bers`` or ``target_losses`` (with loss_mode and
    search_trials); trials, max_trials, ci_width, seed, batch, provider, threads, patch, outcome
    (the scored output) and model_name. Network granularities (layer, module, optype, bit) share
    one set of fault samples per BER; patch faults only the input values (every network site at
    scale 0), at its own BER.

    The analysis is a sequence of units (``VulnUnit``: part x BER x trial x batch, each with its
    own random stream), run in rounds on a ``workers.UnitPool``: ``store`` (a ``CampaignStore``)
    commits each one and, resumed, returns the stored ones without running them; ``workers`` > 1 or
    ``ray_address`` run them on Ray. The BER search's steps and the number of trials are decided
    from the units' results alone, so every way of running gives the same units and results.
    ``progress(done, total)`` counts units (the total grows as the search and trials go on)."""
    from .workers import UnitPool, threads_per_worker

    t0 = time.perf_counter()
    check_vuln(spec)
    grans = list(dict.fromkeys(spec.granularity))
    targets = [float(x) for x in spec.target_losses]
    ber = float(spec.bers[0]) if spec.bers else None
    if store is not None:
        store.register(spec.model_name, "vuln", spec.to_json())
    setup = VulnSetup(model, data, spec, spec.threads, progress)
    camp = setup.campaign
    result = VulnResult(spec.model_name, grans, camp.clean, len(data), spec.batch, spec.seed,
                        len(setup.network_sites), spec.loss_mode, patch_grid=setup.patch_grid,
                        outputs=camp.judge.describe(), spec=spec.to_json())
    if workers > 1 or ray_address:
        payload = {"model": model.SerializeToString(), "data": data, "spec": spec.to_json(),
                   "threads": threads_per_worker(workers, spec.threads)}
        pool = UnitPool(VulnRunner, payload, store, workers, ray_address, progress)
    else:
        pool = UnitPool(lambda _: setup.runner(), None, store, progress=progress)
    n_batches = len(camp.starts)
    with pool:
        for part, (scales, comps, names) in setup.parts.items():
            if targets:
                cache: dict = {}
                start = 1e-12 if part == "network" else 1e-9
                found = []
                for loss in targets:
                    goal = target_accuracy(camp.clean, loss, spec.loss_mode)
                    b, _ = search_ber(lambda x: search_accuracy(pool, spec.model_name, part, n_batches, x,
                                                                spec.search_trials), goal, start=start, cache=cache)
                    found.append({"loss": loss, "target_accuracy": goal, "ber": b})
                result.searches.append({"part": part, "targets": found, "trials": spec.search_trials,
                                        "points": sorted([b, a] for b, a in cache.items())})
                bers = [(f["ber"], f["loss"]) for f in found]
            else:
                bers = [(ber, None)]
            for b, loss in bers:  # (with no components: the unprotected accuracy alone, for "model")
                run = factor_run(pool, spec.model_name, part, n_batches, b, comps, spec.trials, spec.max_trials,
                                 spec.ci_width)
                result.runs.append(_run_dict(part, run, loss, names))
    result.seconds = time.perf_counter() - t0
    return result
