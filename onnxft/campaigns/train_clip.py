"""Thresholds for clipped activations: profiling (Ranger) and training (joint, or ProAct's progressive).

Kept apart from the pass (``passes.clip``), which never runs a session: this step runs the model
and returns plain data (``{tensor: threshold array}``) plus a report; ``clip_thresholds`` then
builds the clipped model with the pass. See docs/proact.md for the objective and the gradient.

Methods:

- ``ranger``: one threshold per layer = the largest value the activation takes on the training
  data (Ranger); no training; clamp mode by default.
- ``layer``: one threshold per layer, all layers trained jointly.
- ``neuron``: one threshold per channel in every layer, trained jointly (FitAct-style).
- ``hybrid``: neuron-wise in the last activation layer, layer-wise elsewhere, trained jointly.
- ``proact``: the hybrid thresholds trained progressively, one layer at a time, all others frozen.

Objective (every method that trains): ``J(t) = CE(model clipped at t) + penalty * mean over layers
of mean over that layer's thresholds of (t / t0)^2``, with ``t0`` the profiled maximum (the
starting point). Gradient of the cross-entropy: central finite differences along directions in
threshold space, each a pair of onnxruntime runs of the clipped model whose thresholds are graph
inputs — exact coordinate derivatives when a step trains at most ``directions`` thresholds, else
the unbiased forward-gradient estimate along ``directions`` random sign vectors.
"""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..passes.clip import ClipError, ClipSites, clip_activations, find_clip_sites, threshold_shape
from ..runtime.data import Dataset
from ..runtime.session import make_session
from .calibrate_ranges import _with_outputs

__all__ = ["ClipTrainOptions", "ClipTrainResult", "METHODS", "profile_activations", "clip_thresholds",
           "objective"]

METHODS = ("proact", "hybrid", "layer", "neuron", "ranger")
ORDERS = ("forward", "backward")
_S_MIN = 0.02  # thresholds never go below 2% of the profiled maximum


@dataclass(frozen=True)
class ClipTrainOptions:
    """``method`` (see the module docstring); ``mode``: zero or clamp (None: clamp for ranger, zero
    otherwise); ``epochs``: passes over the training items per trained block (a layer for proact,
    all thresholds otherwise); ``penalty``: weight of the threshold term; ``lr``: Adam step on
    thresholds in units of their starting value; ``batch``: items per step; ``limit``: training
    items used; ``fd_step``: finite-difference step (units of the starting value); ``directions``:
    most directions per gradient estimate; ``order``: forward (input to output) or backward;
    ``tol``: an epoch that lowers J by less ends the block early."""

    method: str = "proact"
    mode: str | None = None
    epochs: int = 3
    penalty: float = 0.02
    lr: float = 0.05
    batch: int = 256
    limit: int = 512
    fd_step: float = 0.01
    directions: int = 24
    order: str = "forward"
    tol: float = 1e-4
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown clip method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.mode not in (None, "zero", "clamp"):
            raise ValueError(f"unknown clip mode {self.mode!r}; choose zero or clamp")
        if self.order not in ORDERS:
            raise ValueError(f"unknown training order {self.order!r}; choose forward or backward")
        if self.epochs < 0 or self.batch < 1 or self.limit < 1 or self.directions < 1:
            raise ValueError("--epochs must be >= 0; batch, limit and directions >= 1")
        if not (self.penalty >= 0 and self.lr > 0 and 0 < self.fd_step < 0.5):
            raise ValueError("--penalty must be >= 0, lr > 0 and the finite-difference step in (0, 0.5)")

    @property
    def clip_mode(self) -> str:
        return self.mode or ("clamp" if self.method == "ranger" else "zero")


@dataclass
class ClipTrainResult:
    model: onnx.ModelProto
    thresholds: dict  # tensor -> np.ndarray
    report: dict = field(default_factory=dict)


def profile_activations(model: onnx.ModelProto, sites: ClipSites, data: Dataset, batch: int = 256,
                        threads: int | None = None) -> dict[str, dict]:
    """Per site: the activation's shape (batch axis included, from the first batch), its largest
    value, and the largest value per channel (``threshold_shape(shape, "neuron")``), over the
    finite values of ``data``."""
    tensors = sites.tensors
    sess = make_session(_with_outputs(model, tensors), "cpu", threads=threads, level="basic")
    out: dict[str, dict] = {}
    for start in range(0, len(data), batch):
        values = sess.run(tensors, data.batch(start, min(start + batch, len(data))))
        for t, v in zip(tensors, values):
            v = np.where(np.isfinite(v), v, -np.inf)
            shape = threshold_shape(v.shape, "neuron")
            axes = tuple(i for i in range(v.ndim) if i != (1 if v.ndim >= 4 else v.ndim - 1))
            ch = v.max(axis=axes).reshape(shape)
            if t not in out:
                out[t] = {"shape": list(v.shape), "channel_max": ch}
            else:
                out[t]["channel_max"] = np.maximum(out[t]["channel_max"], ch)
    for t, d in out.items():
        d["max"] = float(np.max(d["channel_max"]))
    return out


def _granularities(method: str, n: int) -> list[str]:
    if method in ("ranger", "layer"):
        return ["layer"] * n
    if method == "neuron":
        return ["neuron"] * n
    return ["layer"] * (n - 1) + ["neuron"]  # hybrid, proact: neuron-wise in the last activation layer


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -logp[np.arange(len(labels)), labels]
    return float(np.mean(np.where(np.isfinite(ce), ce, 50.0)))


class _Trainable:
    """The clipped model with the thresholds ``names`` as graph inputs, cut where they start to
    matter: the nodes downstream of those thresholds only, fed with the tensors that cross into
    them, computed once over the training items (they do not depend on the trained thresholds) and
    cached. ``loss(t)`` is the mean cross-entropy at thresholds ``t`` ({name: array}; other names
    are ignored). The cut falls back to the whole model when a crossing tensor has no batch axis
    (a shape computation) or a node carries a subgraph."""

    def __init__(self, clipped: onnx.ModelProto, names: list[str], data: Dataset, threads):
        m = copy.deepcopy(clipped)
        g = m.graph
        found = {i.name: i for i in g.initializer if i.name in names}
        keep = [i for i in g.initializer if i.name not in names]
        del g.initializer[:]
        g.initializer.extend(keep)
        for n in names:
            g.input.append(helper.make_tensor_value_info(n, found[n].data_type, list(found[n].dims)))
        self.names = list(names)
        self.labels = data.labels
        self.cache_bytes = 0
        self.inputs = dict(data.inputs)
        cut = self._cut(m, data, threads)
        self.sess = make_session(cut or m, "cpu", threads=threads, level="basic")
        self.output = self.sess.get_outputs()[0].name
        self.cut = cut is not None

    def _cut(self, m: onnx.ModelProto, data: Dataset, threads) -> onnx.ModelProto | None:
        g = m.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
            return None
        inits = {i.name for i in g.initializer}
        dep = {i.name for i in g.input if i.name not in inits and i.name not in self.names}
        desc = set(self.names)
        keep_nodes, crossing = [], []
        for n in g.node:
            data_dependent = any(i in dep for i in n.input)
            downstream = any(i in desc for i in n.input)
            if data_dependent:
                dep.update(n.output)
            if downstream:
                desc.update(n.output)
                keep_nodes.append(n)
                crossing += [i for i in n.input if i and i in dep and i not in desc and i not in crossing]
            elif not data_dependent:
                keep_nodes.append(n)  # constants and constant folding: kept, they cost nothing
        if not crossing:
            return None
        sess = make_session(_with_outputs(self._with_initializers(m), crossing), "cpu", threads=threads,
                            level="basic")
        cached = {c: [] for c in crossing}
        for s in range(0, len(data), 256):
            for c, v in zip(crossing, sess.run(crossing, data.batch(s, min(s + 256, len(data))))):
                cached[c].append(v)
        arrays = {}
        for c, parts in cached.items():
            if any(p.ndim == 0 or p.shape[0] != len(next(iter(data.batch(s, s + len(p)).values())))
                   for s, p in zip(range(0, len(data), 256), parts)):
                return None
            arrays[c] = np.concatenate(parts)
        cut = helper.make_graph(
            keep_nodes, g.name + "_cut",
            [helper.make_tensor_value_info(c, helper.np_dtype_to_tensor_dtype(a.dtype),
                                           ["batch", *a.shape[1:]]) for c, a in arrays.items()]
            + [i for i in g.input if i.name in self.names],
            list(g.output), list(g.initializer))
        out = helper.make_model(cut, opset_imports=list(m.opset_import), ir_version=m.ir_version)
        self.inputs = arrays
        self.cache_bytes = int(sum(a.nbytes for a in arrays.values()))
        return out

    def _with_initializers(self, m: onnx.ModelProto) -> onnx.ModelProto:
        """``m`` with the trained thresholds back as initializers (their values do not matter for
        the crossing tensors, which are upstream of them)."""
        out = copy.deepcopy(m)
        dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in out.graph.input}
        types = {i.name: i.type.tensor_type.elem_type for i in out.graph.input}
        keep = [i for i in out.graph.input if i.name not in self.names]
        del out.graph.input[:]
        out.graph.input.extend(keep)
        for n in self.names:
            arr = np.ones(dims[n], helper.tensor_dtype_to_np_dtype(types[n]))
            out.graph.initializer.append(numpy_helper.from_array(arr, n))
        return out

    def loss(self, t: dict[str, np.ndarray], items: np.ndarray | None = None) -> float:
        feeds_t = {k: np.asarray(t[k], np.float32) for k in self.names}
        idx = np.arange(len(self.labels)) if items is None else items
        total = 0.0
        for s in range(0, len(idx), 512):
            sel = idx[s:s + 512]
            feeds = {k: v[sel] for k, v in self.inputs.items()}
            logits = self.sess.run([self.output], {**feeds, **feeds_t})[0]
            total += _cross_entropy(logits, self.labels[sel]) * len(sel)
        return total / len(idx)


def objective(ce: float, scaled: dict[str, np.ndarray], penalty: float) -> float:
    """J = CE + penalty * mean over layers of mean((t / t0)^2)."""
    return ce + penalty * float(np.mean([np.mean(np.square(s)) for s in scaled.values()]))


def _train_block(net: _Trainable, block: list[str], scaled: dict[str, np.ndarray], t0: dict[str, np.ndarray],
                 opts: ClipTrainOptions, rng: np.random.Generator, log: list) -> dict:
    """Adam on the scaled thresholds of ``block`` (all others fixed); returns the block's record."""
    n_layers = len(scaled)
    sizes = [scaled[b].size for b in block]
    n = int(sum(sizes))

    def thresholds(s_all):
        return {k: s_all[k] * t0[k] for k in s_all}

    def unflat(vec):
        out, i = {}, 0
        for b, k in zip(block, sizes):
            out[b] = vec[i:i + k].reshape(scaled[b].shape)
            i += k
        return out

    flat = np.concatenate([scaled[b].ravel() for b in block]).astype(np.float64)
    # d penalty / d s = penalty / n_layers * 2 s / (thresholds in that layer)
    pen_scale = np.concatenate([np.full(k, 2.0 * opts.penalty / (n_layers * k)) for k in sizes])
    m1, m2, step = np.zeros(n), np.zeros(n), 0
    h = opts.fd_step
    start_j = objective(net.loss(thresholds(scaled)), scaled, opts.penalty)
    best_j, best_flat = start_j, flat.copy()
    record = {"block": block, "thresholds": n, "start_objective": start_j, "epochs": []}
    prev_j = start_j
    for epoch in range(opts.epochs):
        order = rng.permutation(len(net.labels))
        for s in range(0, len(order), opts.batch):
            items = order[s:s + opts.batch]
            if n <= opts.directions:
                dirs = np.eye(n)
            else:
                dirs = rng.choice([-1.0, 1.0], size=(opts.directions, n))
            grad = np.zeros(n)
            for d in dirs:
                plus = dict(scaled, **unflat(flat + h * d))
                minus = dict(scaled, **unflat(np.maximum(flat - h * d, 0.0)))
                deriv = (net.loss(thresholds(plus), items) - net.loss(thresholds(minus), items)) / (2 * h)
                grad += deriv * d
            if n > opts.directions:  # random signs: E[d d^T] = I, so the mean of deriv * d is unbiased
                grad /= len(dirs)
            grad += pen_scale * flat
            step += 1
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad * grad
            upd = opts.lr * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-12)
            flat = np.clip(flat - upd, _S_MIN, 1.0)
            scaled = dict(scaled, **unflat(flat))
        j = objective(net.loss(thresholds(scaled)), scaled, opts.penalty)
        record["epochs"].append(j)
        log.append(f"  {', '.join(block) if len(block) < 3 else f'{len(block)} layers'}: epoch {epoch + 1} J={j:.5f}")
        if j < best_j:
            best_j, best_flat = j, flat.copy()
        if prev_j - j < opts.tol:
            break
        prev_j = j
    # the stopping rule keeps the best epoch; a block that never beat its start keeps its start
    accepted = best_j < start_j
    record.update(end_objective=best_j, accepted=accepted)
    return (unflat(best_flat) if accepted else {}), record


def clip_thresholds(model: onnx.ModelProto, train: Dataset, options: ClipTrainOptions = ClipTrainOptions(),
                    progress=None) -> ClipTrainResult:
    """Profile, then (unless ranger) train the thresholds; the clipped model and a report.

    ``train`` needs labels (``y``) for every method that trains; ranger only profiles."""
    options.validate()
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    sites = find_clip_sites(model)
    if not sites:
        raise ClipError(f"nothing to clip: {sites.skipped[-1][1]}")
    data = train.head(min(options.limit, len(train)))
    if options.method != "ranger" and data.labels is None:
        raise ClipError("threshold training needs labelled data: an array 'y' in the --train .npz")
    prof = profile_activations(model, sites, data, threads=options.threads)
    grains = _granularities(options.method, len(sites))
    t0: dict[str, np.ndarray] = {}
    for s, g in zip(sites, grains):
        p = prof[s.tensor]
        base = np.asarray(p["max"]) if g == "layer" else p["channel_max"]
        # a channel that never fired keeps a small positive threshold rather than 0
        t0[s.tensor] = np.maximum(base.astype(np.float64), max(1e-6, 1e-3 * p["max"]))
    report: dict = {"method": options.method, "mode": options.clip_mode, "items": len(data),
                    "options": asdict(options), "log": []}
    thresholds = dict(t0)
    if options.method != "ranger" and options.epochs > 0:
        mode = options.clip_mode
        names = {d["tensor"]: d["threshold"] for d in clip_activations(model, t0, mode, sites).details["layers"]}
        scaled = {names[t]: np.ones_like(v) for t, v in t0.items()}
        t0_by_name = {names[t]: v for t, v in t0.items()}
        rng = np.random.default_rng(options.seed)
        order = list(names.values())
        blocks = ([[b] for b in (order if options.order == "forward" else order[::-1])]
                  if options.method == "proact" else [order])
        report["blocks"] = []
        by_name = {v: k for k, v in names.items()}
        for block in blocks:
            say(f"training {len(block)} threshold tensor(s): {by_name[block[0]] if len(block) == 1 else 'all layers'}")
            t_block = time.perf_counter()
            # frozen thresholds at their current values; the block's become inputs of the cut graph
            current = {t: scaled[names[t]] * t0[t] for t in t0}
            net = _Trainable(clip_activations(model, current, mode, sites).model, block, data, options.threads)
            new, rec = _train_block(net, block, scaled, t0_by_name, options, rng, report["log"])
            scaled.update(new)
            rec.update(seconds=time.perf_counter() - t_block, cache_bytes=net.cache_bytes, cut=net.cut)
            report["blocks"].append(rec)
        thresholds = {t: scaled[names[t]] * t0[t] for t in t0}
        report["objective"] = report["blocks"][-1]["end_objective"] if report["blocks"] else None
        report["cache_bytes"] = max(b["cache_bytes"] for b in report["blocks"])
    res = clip_activations(model, thresholds, options.clip_mode, sites)
    report.update(res.details)
    report["train_seconds"] = time.perf_counter() - t_start
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["skipped"] = [list(s) for s in res.skipped]
    return ClipTrainResult(res.model, thresholds, report)
