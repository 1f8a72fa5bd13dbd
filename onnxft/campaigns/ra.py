"""Resiliency Accuracy (RA): accuracy given exactly ``k`` faults in one inference
(docs/resiliency_accuracy.md).

* ``estimate_ra``: RA_k by plain Monte Carlo (``method="mc"``), or by importance sampling
  (``method="is"``) over fault *strata* (site, kind, bit) with a proposal learned from a pilot run
  and likelihood-ratio weights (for k faults: a product of per-fault proposals).
* ``ra_curve``: accuracy against BER under the operation-wise model from conditional campaigns,
  ``acc(BER) = sum_k P(K = k) RA_k`` with ``K ~ Binomial(bits per inference, BER)``.

Every item of a batch is one inference with its own faults. Items are visited in order, pass after
pass (``pass`` plays the role of eval's trial), with one random stream per (seed, k, pass, batch).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..faults.sampling import Faults, SitePlan, sample_exact_faults
from ..passes.inject import SiteSelection
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession
from .evaluate import campaign_graph
from .outcomes import DUE, MASKED, SDC, Judge, OutcomeOptions, output_batch_axes
from .stats import wilson_interval

Z95 = 1.959963984540054
METHODS = ("mc", "is")


RA_METRICS = ("top1", "sdc")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed)] + [int(s) for s in stream])))


# ---------------------------------------------------------------------------------------------
# Fault spaces: the fault model of one inference, cut into strata (site, kind, bit)
# ---------------------------------------------------------------------------------------------

@dataclass
class Strata:
    """A single-fault law cut into strata. ``mass[s]`` is the probability that the fault lies in
    stratum ``s``; within a stratum the fault model's own conditional law is used by ``draw``, so a
    proposal over strata has likelihood ratio ``mass[s] / q[s]``."""

    site: np.ndarray
    kind: np.ndarray  # index into ``kinds``
    bit: np.ndarray
    mass: np.ndarray
    kinds: tuple[str, ...]
    width: np.ndarray | None = None  # bits of the stratum's value (for the bit-position heuristic)
    floating: np.ndarray | None = None  # the value is a float (None: the 32-bit ones are)

    def __len__(self) -> int:
        return len(self.site)

    def classes(self) -> np.ndarray:
        """Stratum -> class (kind, bit), pooled over sites: what the pilot learns rates for."""
        width = int(self.bit.max()) + 1 if len(self) else 1
        return self.kind * width + self.bit


class OpWiseSpace:
    """The operation-wise model of docs/fault_model.md for one fault: every (operation, bit)
    position equally likely. Kinds: product, sum (partial sums), bias, element (elementwise)."""

    kinds = ("product", "sum", "bias", "element")
    name = "op"

    def __init__(self, plans: list[SitePlan]):
        self.plans = plans
        site, kind, bit, count, width, floating = [], [], [], [], [], []
        for i, p in enumerate(plans):
            if p.site.scale == 0:
                continue
            if p.site.scale != 1:
                raise ValueError("RA needs BER scales of 0 or 1")
            if p.site.kind == "elementwise":
                parts = [(3, p.elements, p.site.widths["element"])]
            else:
                wp, wa = p.site.widths["product"], p.site.widths["sum"]
                parts = [(0, p.elements * p.k, wp), (1, p.elements * (p.k - 1), wa)]
                if p.site.bias:
                    parts.append((2, p.elements, wa))
            for kd, n, w in parts:
                if n <= 0:
                    continue
                site += [i] * w
                kind += [kd] * w
                bit += list(range(w))
                count += [n] * w
                width += [w] * w
                floating += [p.site.format != "int8"] * w
        count = np.array(count, np.float64)
        self.count = count.astype(np.int64)
        self.strata = Strata(np.array(site, np.int64), np.array(kind, np.int64), np.array(bit, np.int64),
                             count / count.sum(), self.kinds, np.array(width, np.int64),
                             np.array(floating, bool))

    def bits_per_item(self) -> int:
        return int(self.count.sum())

    def distinct_probability(self, k: int) -> float:
        """P(k independent uniform positions are distinct) = prod_{i<k} (1 - i/n)."""
        n = self.bits_per_item()
        return float(np.prod(1.0 - np.arange(k) / n))

    def draw_tuples(self, strata: np.ndarray, rng: np.random.Generator, feeds=None, plans=None):
        """``strata[i]``: the k faults of item i, each drawn in its stratum. Returns (faults, valid):
        an item whose k positions are not distinct is outside the target law (a uniform k-subset)
        and is run without faults, with ``valid`` False (its weight is 0)."""
        items, k = strata.shape
        f = self.draw(strata.ravel(), np.repeat(np.arange(items), k), rng)
        valid = np.ones(items, bool)
        if k > 1:
            key = np.stack([f.item, f.site, f.element, f.step, f.bit], axis=1)
            u, counts = np.unique(key, axis=0, return_counts=True)
            valid[u[counts > 1, 0]] = False
            f = f.subset(valid[f.item])
        return f, valid

    def draw(self, strata: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> Faults:
        """One fault per entry: uniform over the stratum's operations, for ``items[i]``."""
        st = self.strata
        site, kind, bit = st.site[strata], st.kind[strata], st.bit[strata]
        u = rng.integers(0, self.count[strata])
        k = np.array([self.plans[s].k for s in site.tolist()], np.int64)
        element = np.where(kind == 0, u // np.maximum(k, 1), np.where(kind == 1, u // np.maximum(k - 1, 1), u))
        step = np.select([kind == 0, kind == 1, kind == 2], [u % np.maximum(k, 1), k + u % np.maximum(k - 1, 1),
                                                              2 * k - 1], 0)
        return Faults(site, items.astype(np.int64), element, step, bit)


# ---------------------------------------------------------------------------------------------
# Running inferences
# ---------------------------------------------------------------------------------------------

class Runner:
    """An injection session over a dataset, batch by batch, with each item's fault-free score (the
    baseline that the control variate uses).

    Every faulty item is classified masked / SDC / DUE against the fault-free run by the shared
    ``campaigns.outcomes.Judge`` (``outcome``: checked outputs and SDC criterion, as eval's
    ``--output``/``--sdc``/``--tol``). An item is *good* when, with ``metric="top1"``, its top-1
    prediction equals the label and it is not DUE (RA = accuracy given the faults), or, with
    ``metric="sdc"``, it is masked (RA = 1 - SDC - DUE; every fault-free item is good)."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch: int = 64, provider: str = "auto",
                 selection: SiteSelection | None = None, int_widths=(16, 32), threads: int | None = None,
                 outcome: OutcomeOptions | None = None, metric: str = "top1"):
        if metric not in RA_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(RA_METRICS)}")
        if metric == "top1" and data.labels is None:
            raise ValueError("RA as accuracy needs labels (array 'y'): add them, or use --metric sdc (1 - SDC - DUE)")
        self.model = model
        self.data = data
        self.batch = batch
        self.metric = metric
        self.sess = InjectionSession(campaign_graph(model, selection, int_widths), provider, threads, level="basic")
        self.starts = list(range(0, len(data), batch))
        self.plans, self.clean_out, self.clean_correct = [], [], []
        for s in self.starts:
            out, plans = self.sess.clean(self.feeds(s))
            self.plans.append(plans)
            self.clean_out.append(out)
        axes = output_batch_axes(self.sess.outputs_any_shape, data, self.sess.output_names)
        self.judge = Judge(self.sess.output_names, self.clean_out[0], outcome or OutcomeOptions(),
                           items=self.feeds(0).batch_size, axes=axes)
        for j, s in enumerate(self.starts):
            out = self.clean_out[j]
            items = min(s + batch, len(data)) - s
            good = self.judge.correct(out, self.labels(s)) if metric == "top1" else np.ones(items, bool)
            self.clean_correct.append(np.asarray(good, bool))
        self.clean = float(np.mean(np.concatenate(self.clean_correct)))
        self.inferences = 0

    def feeds(self, start: int):
        return self.data.batch(start, start + self.batch)

    def labels(self, start: int):
        return None if self.data.labels is None else self.data.labels[start:start + self.batch]

    def run(self, j: int, faults: Faults) -> np.ndarray:
        """Good items (see the class docstring) of batch ``j`` under ``faults``."""
        return self.run_codes(j, faults)[0]

    def run_codes(self, j: int, faults: Faults) -> tuple[np.ndarray, np.ndarray]:
        """(good items, outcome codes MASKED / SDC / DUE) of batch ``j`` under ``faults``."""
        s = self.starts[j]
        out = self.sess.run(self.feeds(s), faults, self.plans[j])
        self.inferences += len(self.clean_correct[j])
        codes = self.judge.classify(out, self.clean_out[j], self.labels(s))
        if self.metric == "top1":  # (Judge.correct, with the DUE test classify has just made)
            good = (self.judge.predictions(out) == np.asarray(self.labels(s))) & (codes != DUE)
        else:
            good = codes == MASKED
        return np.asarray(good, bool), codes

    def visits(self, seed: int, stream: int):
        """(pass, batch index) forever: every batch once per pass, in a random order per pass, so
        that a run stopped inside a pass still sees each item with the same probability."""
        t = 0
        while True:
            for j in _rng(seed, 1 << 20, stream, t).permutation(len(self.starts)).tolist():
                yield t, j
            t += 1


# ---------------------------------------------------------------------------------------------
# RA_k
# ---------------------------------------------------------------------------------------------

@dataclass
class RAEstimate:
    k: int
    value: float
    ci: tuple[float, float]
    inferences: int
    method: str
    ess: float
    hw: str
    clean: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


class _Samples:
    """The per-inference values ``y_i`` of an estimator (mean = RA) with their weights, kept by
    stage (pilot, main) so that the variance is estimated within each stage's own law."""

    def __init__(self):
        self.stages: list[list[np.ndarray]] = [[], []]
        self.weights: list[np.ndarray] = []
        self.correct = 0

    def add(self, stage: int, y: np.ndarray, w: np.ndarray, correct: np.ndarray):
        self.stages[stage].append(y)
        self.weights.append(w)
        self.correct += int(correct.sum())

    @property
    def n(self) -> int:
        return sum(len(a) for s in self.stages for a in s)

    def mean_and_se(self) -> tuple[float, float]:
        n = self.n
        total, var_sum = 0.0, 0.0
        w_all = np.concatenate(self.weights)
        for s in self.stages:
            if not s:
                continue
            y = np.concatenate(s)
            total += y.sum()
            # Floor: a run that saw no outcome change has zero sample variance; never claim a
            # half-width below what Wilson gives a proportion with no success (z^2 / n), in units
            # of the mean weight.
            floor = float(np.mean(w_all)) ** 2 * Z95**2 / len(y)  # zero changes: Wilson's upper bound z^2/n
            var_sum += len(y) * max(y.var(ddof=1) if len(y) > 1 else 0.0, floor)
        return total / n, math.sqrt(var_sum) / n

    def ess(self) -> float:
        w = np.concatenate(self.weights)
        return float(w.sum() ** 2 / np.sum(w * w)) if len(w) else 0.0


def _ci(s: _Samples, method: str) -> tuple[float, tuple[float, float], float]:
    if method == "mc":  # a plain proportion
        return s.correct / s.n, wilson_interval(s.correct, s.n), Z95 * math.sqrt(0.25 / s.n)
    mean, se = s.mean_and_se()
    lo, hi = mean - Z95 * se, mean + Z95 * se
    return mean, (max(0.0, lo), min(1.0, hi)), Z95 * se


def _half_width(s: _Samples, method: str) -> float:
    _, (lo, hi), _ = _ci(s, method)
    return (hi - lo) / 2


def estimate_ra(runner: Runner, space_for, k: int = 1, method: str = "mc", budget: int | None = 2000,
                ci_width: float | None = None, seed: int = 0, hw: str = "op", pilot: int | None = None,
                alpha: float = 0.1, progress=None) -> RAEstimate:
    """RA_k with a 95% interval. ``space_for(plans)`` gives the fault space of one batch
    (``OpWiseSpace`` or a variable-level space); ``None`` means the operation-wise model sampled
    with ``sample_exact_faults`` (the only way to get ``k > 1`` faults).

    Stops when the interval's half-width is at most ``ci_width`` (checked after every batch, once
    the pilot is done) or after ``budget`` inferences (at least one is required)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if budget is None and ci_width is None:
        raise ValueError("give a budget (--budget N) or a target interval half-width (--ci-width W)")
    if budget is not None and budget < 1:
        raise ValueError("--budget must be at least 1")
    if ci_width is not None and not ci_width > 0:
        raise ValueError("--ci-width must be positive")
    if k < 0:
        raise ValueError("--faults must be at least 0")
    if method == "is" and k < 1:
        raise ValueError("importance sampling needs at least one fault per inference (--faults >= 1)")
    start = runner.inferences
    samples = _Samples()
    outcome_rates = {"sdc": _Samples(), "due": _Samples()}  # SDC and DUE rates given k faults, same draws
    cap = budget if budget is not None else 10**9
    spaces: dict[int, object] = {}

    def space(j):
        if j not in spaces:
            spaces[j] = space_for(runner.plans[j])
        return spaces[j]

    proposals: dict[int, np.ndarray] = {}  # per batch (its strata), once the pilot is done
    if method == "is":
        n_pilot = pilot if pilot is not None else max(runner.batch, min(cap // 5, 256))
    else:
        n_pilot = 0
    stage = 0 if n_pilot else 1
    rates, pilot_log = None, []
    for t, j in runner.visits(seed, k):
        done = runner.inferences - start
        if done >= cap:
            break
        if stage == 0 and done >= n_pilot:
            rates = _pilot_rates(pilot_log)
            stage = 1
        if stage == 1 and ci_width is not None and samples.n >= max(2 * runner.batch, n_pilot + runner.batch) \
                and _half_width(samples, method) <= ci_width:
            break
        rng = _rng(seed, k, t, j)
        items = len(runner.clean_correct[j])
        if k == 0 or space_for is None:
            faults = Faults.empty() if k == 0 else sample_exact_faults(runner.plans[j], k, rng)
            correct, codes = runner.run_codes(j, faults)
            ones = np.ones(items)
            samples.add(1, correct.astype(np.float64), ones, correct)
            for name, code in (("sdc", SDC), ("due", DUE)):
                outcome_rates[name].add(1, (codes == code).astype(np.float64), ones, codes == code)
        else:
            sp = space(j)
            st = sp.strata
            if method == "mc":
                q = st.mass
            elif stage == 0 or rates is None:  # the pilot, or no pilot at all: the heuristic
                q = _pilot_proposal(st)
            else:
                if j not in proposals:
                    proposals[j] = _proposal(st, rates, alpha)
                q = proposals[j]
            # k faults per item, each from q independently: the likelihood ratio is the product;
            # a tuple outside the target law (two faults on one position, op-wise) weighs 0 and the
            # rest are scaled by 1 / P_p(distinct) (``draw_tuples``)
            strata = rng.choice(len(st), size=(items, k), p=q)
            # (a space reads its batch's fault-free operands once, on its first draw: spaces are per batch)
            feeds = runner.feeds(runner.starts[j])
            faults, valid = sp.draw_tuples(strata, rng, feeds, runner.plans[j])
            correct, codes = runner.run_codes(j, faults)
            w = np.prod(st.mass[strata] / q[strata], axis=1) * valid / sp.distinct_probability(k)
            clean = runner.clean_correct[j].astype(np.float64)
            # Control variate: RA = (fault-free accuracy of the items, known exactly) - E_p[clean -
            # faulty], and y = clean accuracy - w (clean - faulty) has E_q[y] = RA for any proposal
            # that covers the law; masked faults contribute no variance.
            y = runner.clean - w * (clean - correct)
            samples.add(stage, y, w, correct)
            for name, code in (("sdc", SDC), ("due", DUE)):  # rates are 0 without faults: E_q[w 1{code}]
                outcome_rates[name].add(stage, w * (codes == code), w, codes == code)
            if stage == 0:  # with k faults, the tuple's outcome is credited to each of its classes
                pilot_log.append((st.classes()[strata].ravel(), st.site[strata].ravel(),
                                  np.repeat(clean != correct, k)))
        if progress:
            progress(runner.inferences - start)
    if samples.n == 0:
        raise ValueError("no inference was run (budget too small?)")
    value, ci, _ = _ci(samples, method)
    extra = {"pilot": n_pilot if method == "is" else 0, "metric": runner.metric}
    for name, r in outcome_rates.items():
        v, c, _ = _ci(r, method)
        extra[name], extra[f"{name}_ci"] = float(v), [float(c[0]), float(c[1])]
    return RAEstimate(k, float(value), (float(ci[0]), float(ci[1])), runner.inferences - start, method,
                      samples.ess(), hw, runner.clean, extra)


HEURISTIC_ALPHA = 0.3


def bit_prior(st: Strata) -> np.ndarray:
    """The DNN heuristic of the pilot: relative chance that a flip of this bit changes an outcome.
    For 32-bit floats the exponent's top bit (30) turns a value below 2 into one above 2^64, the
    other exponent bits and the sign move it by powers of two, mantissa bits by less than 2x; for
    integers of width w the top quarter of the bits carries the large changes."""
    width = st.width if st.width is not None else np.full(len(st), 32)
    fp = st.floating if st.floating is not None else width == 32
    prior = np.ones(len(st))
    # float32: exponent bits 23..30, sign 31; float16: exponent bits 10..14, sign 15
    mant = np.where(width == 16, 10, 23)
    top = width - 2  # the exponent's top bit
    prior[fp & (st.bit == top)] = 64.0
    prior[fp & (((st.bit >= mant) & (st.bit < top)) | (st.bit == width - 1))] = 4.0
    prior[~fp & (st.bit >= width - np.maximum(width // 4, 1))] = 8.0
    return prior


def _pilot_proposal(st: Strata) -> np.ndarray:
    """Pilot proposal: the defensive mixture with the bit-position heuristic in place of rates
    learned from data (every stratum keeps at least ``HEURISTIC_ALPHA`` of its own mass)."""
    h = st.mass * bit_prior(st)
    q = HEURISTIC_ALPHA * st.mass + (1 - HEURISTIC_ALPHA) * h / h.sum()
    return q / q.sum()


def _pilot_rates(pilot) -> dict:
    cls = np.concatenate([p[0] for p in pilot])
    site = np.concatenate([p[1] for p in pilot])
    hit = np.concatenate([p[2] for p in pilot]).astype(np.float64)
    return {"class": cls, "site": site, "hit": hit}


def _proposal(st: Strata, rates: dict, alpha: float) -> np.ndarray:
    """Defensive mixture ``q = alpha p + (1 - alpha) h`` with ``h ∝ p x r``: ``r`` the pilot's
    rate of outcome-changing faults of the stratum's class (kind, bit), shrunk towards the
    bit-position prior (scaled to the pilot's overall rate), times the site's rate relative to its
    classes (shrunk the same way). ``q >= alpha p`` keeps every weight at most ``1 / alpha``."""
    cls = st.classes()
    prior = bit_prior(st)
    # the prior's rate per class, scaled so that it predicts the pilot's pooled hit rate
    ucls_all, first = np.unique(cls, return_index=True)
    prior_c = dict(zip(ucls_all.tolist(), prior[first].tolist()))
    seen_prior = np.array([prior_c[c] for c in rates["class"].tolist()])
    scale = (rates["hit"].sum() + 0.5) / (seen_prior.sum() + 1)
    m = 2.0
    ucls, inv = np.unique(rates["class"], return_inverse=True)
    hits_c = np.bincount(inv, weights=rates["hit"])
    n_c = np.bincount(inv).astype(np.float64)
    lookup = {c: (h + m * scale * prior_c[c]) / (n + m) for c, h, n in zip(ucls.tolist(), hits_c, n_c)}
    r_class = np.array([lookup.get(c, scale * prior_c[c]) for c in cls.tolist()])
    # site factor: hits at the site against what its classes' rates predict
    expect = np.array([lookup[c] for c in rates["class"].tolist()])
    usite, sinv = np.unique(rates["site"], return_inverse=True)
    obs_s = np.bincount(sinv, weights=rates["hit"])
    exp_s = np.bincount(sinv, weights=expect)
    factor = dict(zip(usite.tolist(), ((obs_s + m * 0.5) / (exp_s + m * 0.5)).tolist()))
    r = r_class * np.array([factor.get(s, 1.0) for s in st.site.tolist()])
    h = st.mass * r
    h = h / h.sum() if h.sum() > 0 else st.mass
    q = alpha * st.mass + (1 - alpha) * h
    return q / q.sum()


# ---------------------------------------------------------------------------------------------
# The BER curve from conditional campaigns (operation-wise model)
# ---------------------------------------------------------------------------------------------

def binomial_pmf(n: int, p: float, ks) -> np.ndarray:
    ks = np.asarray(ks, np.float64)
    if p <= 0:
        return (ks == 0).astype(np.float64)
    if p >= 1:
        return (ks == n).astype(np.float64)
    lg = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])
    return np.exp(lg + ks * math.log(p) + (n - ks) * math.log1p(-p))


def binomial_tail(n: int, p: float, k_max: int) -> float:
    """P(K > k_max), summed term by term from k_max + 1 (no cancellation for tiny tails)."""
    if p <= 0 or k_max >= n:
        return 0.0
    total, k = 0.0, k_max + 1
    term = float(binomial_pmf(n, p, [k])[0])
    mode = (n + 1) * p
    while k <= n:
        total += term
        if k > mode and term < 1e-18 * max(total, 1e-300):
            break
        term *= (n - k) / (k + 1) * p / (1 - p)
        k += 1
    return min(total, 1.0)


def choose_k_max(n_bits: int, bers: list[float], tail: float = 1e-3, cap: int = 64) -> int:
    """The smallest k_max with P(K > k_max) <= tail at every BER (at most ``cap``)."""
    for k in range(cap + 1):
        if all(binomial_tail(n_bits, b, k) <= tail for b in bers):
            return k
    return cap


def proposal_over_k(pmf: np.ndarray, moved_rate: np.ndarray, ber_weight: np.ndarray, defensive: float = 0.5
                    ) -> np.ndarray:
    """The law ``g`` of k (k = 1..k_max) the curve's inferences draw their fault count from.

    The point at BER ``b`` is estimated by the mean of ``z = P_b(k)/g(k) d`` (``d`` = fault-free
    minus faulty score of an inference with k faults), whose variance is about
    ``sum_k P_b(k)^2 E[d^2 | k] / g(k)``. Minimising ``sum_b ber_weight_b x`` that under
    ``sum_k g(k) = 1`` gives (Lagrange) ``g(k) ∝ sqrt(sum_b ber_weight_b P_b(k)^2 E[d^2 | k])``:
    Neyman allocation over k, with the BERs' weights squared. ``pmf`` [B, k_max] holds P_b(k),
    ``moved_rate`` [k_max] estimates E[d^2 | k] (the share of inferences whose outcome changes).
    Mixed with the average law of K given K >= 1 over the BERs (``defensive``), so that every k
    any BER weighs keeps a share and the ratios ``P_b(k)/g(k)`` stay bounded."""
    avg = (pmf / np.maximum(pmf.sum(axis=1, keepdims=True), 1e-300)).mean(axis=0)
    score = np.sqrt((ber_weight[:, None] * pmf**2).sum(axis=0) * np.maximum(moved_rate, 0))
    neyman = score / score.sum() if score.sum() > 0 else avg
    g = defensive * avg + (1 - defensive) * neyman
    return g / g.sum()


def balanced_proposal(pmf: np.ndarray, moved_rate: np.ndarray, direct_var: np.ndarray, rounds: int = 60,
                      defensive: float = 0.5) -> np.ndarray:
    """``proposal_over_k`` with the BERs' weights chosen so that the predicted variance of each
    point relative to ``direct_var`` (the variance of one direct-eval inference there, a (1 - a))
    is as even as possible: multiplicative weights, each round raising the weight of the BERs whose
    predicted ratio is above the mean (towards the minimax allocation)."""
    weight = 1.0 / direct_var
    g = proposal_over_k(pmf, moved_rate, weight, defensive)
    for _ in range(rounds):
        ratio = (pmf**2 * moved_rate[None, :] / g[None, :]).sum(axis=1) / direct_var
        weight = weight * ratio / ratio.mean()
        g = proposal_over_k(pmf, moved_rate, weight, defensive)
    return g


def moved_rate_model(ks: np.ndarray, moved: np.ndarray, k_max: int) -> np.ndarray:
    """E[d^2 | k] for k = 1..k_max from pilot inferences (their k and whether the outcome changed),
    as ``1 - (1 - r)^k`` (each fault changes the outcome with a chance r, independently), r by
    maximum likelihood; shrunk towards r = 1/(n+2) when nothing moved. Only the allocation uses it."""
    ks, moved = np.asarray(ks, np.float64), np.asarray(moved, bool)
    lo, hi = 1e-9, 1.0 - 1e-9
    if moved.any():
        for _ in range(80):  # the log-likelihood is concave in r: bisection on its derivative
            r = (lo + hi) / 2
            p = 1 - (1 - r) ** ks
            grad = np.sum(np.where(moved, ks * (1 - r) ** (ks - 1) / np.maximum(p, 1e-300), -ks / (1 - r)))
            lo, hi = (r, hi) if grad > 0 else (lo, r)
        r = (lo + hi) / 2
    else:
        r = 1.0 / (np.sum(ks) + 2)
    return 1 - (1 - r) ** np.arange(1, k_max + 1)


@dataclass
class CurvePoint:
    ber: float
    value: float
    ci: tuple[float, float]
    truncation: float  # P(K > k_max): the most the omitted terms can add
    faults_per_item: float


def ra_curve(runner: Runner, bers: list[float], budget: int = 2000, k_max: int | None = None,
             tail: float = 1e-3, seed: int = 0, progress=None, pilot: float = 0.2) -> dict:
    """acc(BER) = sum_{k <= k_max} P(K = k) RA_k + (truncation, at most P(K > k_max)) for every BER,
    from one set of conditional inferences (operation-wise model, ``sample_exact_faults``).

    RA_0 is the fault-free score of the items (measured on all of them, exact for this item set);
    RA_k = RA_0 - D_k with D_k the mean of ``d`` = fault-free minus faulty score over k-fault
    inferences (a masked fault adds no variance). Every inference draws its own k from a law ``g``
    over 1..k_max, so every BER's point uses every inference:

        acc(b) = RA_0 (1 - T_b) - mean_i[P_b(k_i) / g(k_i) d_i]   (+ the truncation, in [0, T_b])

    is unbiased for any ``g`` that is positive wherever some P_b is. A pilot (``pilot`` x budget
    inferences) draws k from the BERs' average law of K given K >= 1; the rest from the Neyman
    allocation ``proposal_over_k`` with the pilot's ``E[d^2 | k]`` (``moved_rate_model``) and the
    BERs weighted so that the predicted widths relative to a direct eval at each BER (variance
    acc(1 - acc) per inference, from the pilot) are as even as possible (``balanced_proposal``).
    Interval: normal, variance within each stage (pilot, main) from its own samples, widened above
    by the truncation bound."""
    for b in bers:
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"BER must be in [0, 1], got {b}")
    n_bits = OpWiseSpace(runner.plans[0]).bits_per_item()
    k_max = choose_k_max(n_bits, bers, tail) if k_max is None else int(k_max)
    pmf = np.array([binomial_pmf(n_bits, b, np.arange(k_max + 1)) for b in bers])  # [B, k_max+1]
    live = pmf[:, 1:].sum(axis=0) > 0
    if not live.any():
        raise ValueError("no BER puts weight on k >= 1 faults: nothing to estimate (all BERs 0?)")
    trunc = np.array([binomial_tail(n_bits, b, k_max) for b in bers])
    start = runner.inferences
    n_pilot = max(1, int(budget * pilot))
    stages: list[dict] = []  # per stage: the law g and the samples (k, d)
    g = proposal_over_k(pmf[:, 1:], np.ones(k_max), np.ones(len(bers)), defensive=1.0)
    stage = {"g": g, "k": [], "d": []}
    stages.append(stage)
    for t, j in runner.visits(seed, 0xC0):
        done = runner.inferences - start
        if done >= budget:
            break
        if len(stages) == 1 and done >= n_pilot:
            ks, d = np.concatenate(stage["k"]), np.concatenate(stage["d"])
            rate = moved_rate_model(ks, d != 0, k_max)
            acc = np.clip(runner.clean * (1 - trunc) - _curve_means([stage], pmf)[0], 0.02, 0.98)
            stage = {"g": balanced_proposal(pmf[:, 1:], rate, acc * (1 - acc)), "k": [], "d": []}
            stages.append(stage)
        rng = _rng(seed, 0xC0, t, j)
        items = len(runner.clean_correct[j])
        ks = rng.choice(k_max, size=items, p=stage["g"]) + 1
        faults = sample_exact_faults(runner.plans[j], int(ks.max()), rng)
        # item i keeps its first k_i faults: a prefix of a uniform ordered k-subset is a uniform k_i-subset
        column = np.arange(len(faults)) % int(ks.max())
        faults = faults.subset(column < ks[faults.item])
        good = runner.run(j, faults)
        stage["k"].append(ks)
        stage["d"].append(runner.clean_correct[j].astype(np.float64) - good)
        if progress:
            progress(runner.inferences - start)
    means, ses = _curve_means(stages, pmf)
    points = []
    for bi, b in enumerate(bers):
        value = runner.clean * (1 - trunc[bi]) - means[bi]
        half = Z95 * ses[bi]
        cond = value / (1 - trunc[bi]) if trunc[bi] < 1 else runner.clean
        points.append(CurvePoint(float(b), float(value + trunc[bi] * cond),
                                 (max(0.0, value - half), min(1.0, value + trunc[bi] + half)), float(trunc[bi]),
                                 n_bits * float(b)))
    ks = np.concatenate([np.concatenate(s["k"]) for s in stages if s["k"]])
    d = np.concatenate([np.concatenate(s["d"]) for s in stages if s["d"]])
    per_k = [{"k": 0, "ra": runner.clean, "ci": [runner.clean, runner.clean], "n": len(runner.data)}]
    for k in range(1, k_max + 1):
        sel = d[ks == k]
        n = len(sel)
        m2 = (np.count_nonzero(sel) + 1) / (n + 2)  # smoothed share of changed outcomes >= Var(d)
        ra_k = runner.clean - (sel.mean() if n else 0.0)
        half = Z95 * math.sqrt(m2 / max(n, 1))
        per_k.append({"k": k, "ra": float(ra_k), "ci": [max(0.0, ra_k - half), min(1.0, ra_k + half)], "n": n,
                      "moved": int(np.count_nonzero(sel)),
                      "weight": float(pmf[:, k].max()), "draw_probability": float(stages[-1]["g"][k - 1])})
    return {"points": points, "per_k": per_k, "k_max": k_max, "bits_per_item": n_bits,
            "inferences": int(runner.inferences - start + len(runner.data)), "clean": runner.clean,
            "pilot": int(sum(len(x) for x in stages[0]["k"]))}


def _curve_means(stages: list[dict], pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per BER: the estimate of sum_{k>=1} P_b(k) D_k (mean of z = P_b(k)/g(k) d over all samples)
    and its standard error (variance within each stage, combined as (n_1 v_1 + n_2 v_2) / n^2; a
    stage where no outcome changed is floored at the half-width Wilson gives no success, z^2/n, in
    units of the stage's mean ratio)."""
    total = np.zeros(len(pmf))
    var = np.zeros(len(pmf))
    n_all = 0
    for s in stages:
        if not s["k"]:
            continue
        ks, d = np.concatenate(s["k"]), np.concatenate(s["d"])
        ratio = pmf[:, ks] / s["g"][ks - 1][None, :]  # [B, n]
        z = ratio * d[None, :]
        n = len(d)
        n_all += n
        total += z.sum(axis=1)
        v = z.var(axis=1, ddof=1) if n > 1 else np.zeros(len(pmf))
        floor = ratio.mean(axis=1) ** 2 * Z95**2 / n
        var += n * np.maximum(v, floor)
    n_all = max(n_all, 1)
    return total / n_all, np.sqrt(var) / n_all
