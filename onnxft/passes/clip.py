"""Clipped activations: a bound after every activation whose upper value is a trainable threshold
(Ranger, FitAct, ProAct's hybrid; docs/proact.md).

Two steps, as for range restriction (``passes.ranges``):

1. ``find_clip_sites(model)`` marks the activation outputs to clip (pure, reads the graph only):
   ReLU, GELU (fused, Erf form and tanh form, as ``passes.ranges`` matches them), SiLU
   (``x * Sigmoid(x)``) and HardSwish. Each has a known minimum, which is the fixed lower bound;
   the upper bound is the threshold. In graph order, so "the last activation layer" is the last site.
2. ``clip_activations(model, thresholds, mode)`` inserts the clip (a pure pass). A threshold is a
   scalar (``layer``: one per layer) or a vector over the channel axis (``neuron``: one per
   channel or feature), stored as an initializer ``<tensor>/clip_hi`` so that training
   (``campaigns.train_clip``) can turn it into a graph input and back.

``threshold_shape`` says which axis is a "neuron": axis 1 of an NCHW (rank >= 4) activation, the
last axis of a rank-2 or rank-3 activation ([batch, features] or [batch, tokens, features]).

Modes (NaN-safe as ``passes.ranges``): ``zero`` gives 0 for any value outside ``[lo, hi]``, for
+-Inf and for NaN (FT-ClipAct, FitAct, ProAct); ``clamp`` saturates to the nearer bound (Ranger)
and turns NaN into 0. The output is standard ONNX (opset 11 or later, the model's own opset) that
stock onnxruntime runs; inside the bounds the clip is the identity.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph.edit import default_opset, insert_after, producer_index
from ..graph.roles import PROTECTION, set_meta, set_role
from .ranges import FINDERS as RANGE_FINDERS
from .ranges import FoundSites
from .ranges import _elem_types, _Index, _is, _label, _Names, _used_names
from .result import PassResult

__all__ = ["ClipSite", "ClipSites", "ClipError", "find_clip_sites", "clip_activations", "threshold_shape",
           "threshold_name", "GRANULARITIES", "MODES", "MIN_OPSET", "CLIP_KEY", "KNOWN_MIN"]

GRANULARITIES = ("layer", "neuron", "hybrid")
MODES = ("zero", "clamp")
MIN_OPSET = 11  # Equal on floats, Min/Max with broadcasting, IsNaN, Where
CLIP_KEY = "onnxft.clip_site"  # metadata on inserted nodes: the activation tensor they clip

# The functions' own minima: the fixed lower bounds. min x*sigmoid(x) = -0.278465 at x = -1.27846;
# min x*relu6(x+3)/6 = -0.375 at x = -1.5; GELU from passes.ranges (its tanh form's, the lower one).
KNOWN_MIN = {"relu": 0.0, "gelu": -0.17004, "silu": -0.278465, "hardswish": -0.375}
_LOW_MARGIN = 0.02  # the lower bound sits 2% below the minimum, so rounding never clips a correct value
_FLOAT_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class ClipError(ValueError):
    """A user-facing problem with the model or the thresholds (one clear line)."""


@dataclass(frozen=True)
class ClipSite:
    """One activation output to clip: ``tensor``, ``kind`` (relu, gelu, silu, hardswish), the
    ``nodes`` computing it, and ``low``, the fixed lower bound (the function's minimum, widened)."""

    tensor: str
    kind: str
    nodes: tuple[str, ...]
    low: float


class ClipSites(FoundSites):
    """The clip sites found (ClipSite, in graph order) plus ``skipped``: (node, reason) pairs."""


def _low(kind: str) -> float:
    m = KNOWN_MIN[kind]
    return m - _LOW_MARGIN * abs(m)


def find_clip_sites(model: onnx.ModelProto) -> ClipSites:
    """The activation outputs of the main graph, in graph order, one per tensor."""
    ix = _Index(model)
    found: dict[str, ClipSite] = {}
    skipped: list[tuple[str, str]] = []
    gelu, why = RANGE_FINDERS["gelu"](ix, {})
    skipped += [s for s in why if s[0] != "gelu"]
    for s in gelu:
        found[s.tensor] = ClipSite(s.tensor, "gelu", s.nodes, _low("gelu"))
    for n in ix.nodes:
        if _is(n, "Relu"):
            found.setdefault(n.output[0], ClipSite(n.output[0], "relu", (_label(n),), _low("relu")))
        elif _is(n, "HardSwish"):
            found.setdefault(n.output[0], ClipSite(n.output[0], "hardswish", (_label(n),), _low("hardswish")))
        elif _is(n, "Sigmoid"):  # SiLU: Mul(x, Sigmoid(x)), in either operand order
            mul = ix.sole_consumer(n.output[0])
            if _is(mul, "Mul") and sorted(mul.input) == sorted([n.input[0], n.output[0]]):
                found.setdefault(mul.output[0], ClipSite(mul.output[0], "silu", (_label(n), _label(mul)), _low("silu")))
            else:
                skipped.append((_label(n), "Sigmoid is bounded in [0, 1] already (range restriction covers it)"))
        elif _is(n, "LeakyRelu", "PRelu", "Elu", "Selu"):
            skipped.append((_label(n), f"{n.op_type} has no fixed lower bound to clip to; use range restriction"))
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    sites = sorted(found.values(), key=lambda s: order.get(s.tensor, 0))
    if not sites:
        skipped.append(("clip", "no ReLU, GELU, SiLU or HardSwish in the main graph"))
    return ClipSites(sites, skipped)


def threshold_shape(activation_shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """The shape of a threshold for an activation of ``activation_shape`` (batch axis first):
    ``()`` for ``layer``; for ``neuron`` one value per channel of axis 1 (rank >= 4, NCHW) or of the
    last axis (rank 2 or 3: features), shaped to broadcast against the activation."""
    if granularity == "layer":
        return ()
    if granularity != "neuron":
        raise ClipError(f"unknown threshold granularity {granularity!r}; choose layer or neuron")
    rank = len(activation_shape)
    if rank < 2:
        raise ClipError(f"a rank-{rank} activation has no channel axis for neuron-wise thresholds")
    axis = 1 if rank >= 4 else rank - 1
    return (int(activation_shape[axis]),) + (1,) * (rank - 1 - axis)


def threshold_name(tensor: str) -> str:
    """The initializer holding ``tensor``'s threshold (unless the name was taken)."""
    return f"{tensor}/clip_hi"


def _clip_nodes(mode: str, raw: str, out: str, lo: str, hi: str, fill: str, tmp) -> list[onnx.NodeProto]:
    """clamp: Where(IsNaN(x), 0, Min(Max(x, lo), hi)); zero: Where(Min(Max(x, lo), hi) == x, x, 0).

    Min/Max rather than Clip: Clip's bounds must be scalars, a neuron-wise threshold is a vector.
    Min and Max pass NaN through in onnxruntime, so clamp needs its IsNaN; in zero mode NaN != NaN
    and +-Inf are outside any finite bounds, so both give 0."""
    mx, c = tmp("max"), tmp("clipped")
    nodes = [helper.make_node("Max", [raw, lo], [mx]), helper.make_node("Min", [mx, hi], [c])]
    if mode == "clamp":
        nan = tmp("isnan")
        return nodes + [helper.make_node("IsNaN", [raw], [nan]), helper.make_node("Where", [nan, fill, c], [out])]
    inside = tmp("inside")
    return nodes + [helper.make_node("Equal", [c, raw], [inside]), helper.make_node("Where", [inside, raw, fill], [out])]


def clip_activations(model: onnx.ModelProto, thresholds: Mapping[str, np.ndarray | float], mode: str = "zero",
                     sites: Iterable[ClipSite] | None = None) -> PassResult:
    """Clip each activation tensor of ``thresholds`` (``{tensor: threshold}``) to ``[low, threshold]``.

    A threshold is a float (one for the layer) or an array shaped by ``threshold_shape`` (one per
    channel). ``sites`` (from ``find_clip_sites``) gives each tensor's kind and lower bound; a
    tensor without a site gets lower bound 0 (ReLU's). The producer's output is renamed
    ``<tensor>/unclipped`` and the last clip node writes ``<tensor>``, so consumers and graph output
    names are unchanged. ``details["layers"]`` lists, per tensor, the kind, the threshold's
    initializer name, shape and count. The input model is not modified.
    """
    if mode not in MODES:
        raise ClipError(f"unknown clip mode {mode!r}; choose from {', '.join(MODES)}")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ClipError(f"clipped activations need default opset >= {MIN_OPSET}; the model has {opset}; "
                        "upgrade it with onnx.version_converter first")
    by_tensor = {s.tensor: s for s in sites or ()}
    result = PassResult(model=copy.deepcopy(model), skipped=list(getattr(sites, "skipped", [])))
    graph = result.model.graph
    producers = producer_index(graph)
    types = _elem_types(model)
    names = _Names(_used_names(model))
    inits: list[onnx.TensorProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}
    layers = []
    for tensor, value in thresholds.items():
        hi = np.asarray(value, dtype=np.float64)
        site = by_tensor.get(tensor)
        lo = site.low if site is not None else 0.0
        if not np.all(np.isfinite(hi)) or np.any(hi < lo) or hi.size == 0:
            raise ClipError(f"threshold of {tensor!r} must be finite and at least its lower bound {lo:g}")
        if tensor not in producers:
            result.skipped.append((tensor, "not produced by a node of the main graph"))
            continue
        elem = types.get(tensor)
        if elem not in _FLOAT_NP:
            result.skipped.append((tensor, "element type is not float, float16 or double"))
            continue
        dtype = _FLOAT_NP[elem]
        producer = graph.node[producers[tensor]]
        raw = names.fresh(f"{tensor}/unclipped")
        producer.output[list(producer.output).index(tensor)] = raw
        hi_name = names.fresh(threshold_name(tensor))
        # outward rounding: the stored bound still contains the requested one
        hi_arr = hi.astype(dtype)
        hi_arr = np.where(hi_arr.astype(np.float64) < hi, np.nextafter(hi_arr, dtype(np.inf)), hi_arr).astype(dtype)
        lo_v = dtype(lo)
        if float(lo_v) > lo:
            lo_v = np.nextafter(lo_v, dtype(-np.inf))
        inits.append(numpy_helper.from_array(np.asarray(hi_arr, dtype), hi_name))
        lo_name, fill = names.fresh(f"{tensor}/clip_lo"), names.fresh(f"{tensor}/clip_fill")
        inits.append(numpy_helper.from_array(np.asarray(lo_v, dtype), lo_name))
        inits.append(numpy_helper.from_array(np.asarray(0.0, dtype), fill))
        nodes = _clip_nodes(mode, raw, tensor, lo_name, hi_name, fill, lambda s: names.fresh(f"{tensor}/clip_{s}"))
        base = producer.name or tensor
        for n in nodes:
            n.name = names.fresh(f"{base}/clip/{n.op_type}")
            set_role(n, PROTECTION)
            set_meta(n, CLIP_KEY, tensor)
        after.setdefault(producers[tensor], []).extend(nodes)
        kind = site.kind if site is not None else "relu"
        count = int(hi_arr.size)
        result.inserted.append(f"{kind} {tensor}: {count} threshold{'s' if count > 1 else ''}, {mode} -> "
                               f"{len(nodes)} nodes")
        layers.append({"tensor": tensor, "kind": kind, "low": float(lo_v), "threshold": hi_name,
                       "shape": list(hi_arr.shape), "count": count,
                       "bytes": count * np.dtype(dtype).itemsize,
                       "max": float(np.max(hi_arr)), "min": float(np.min(hi_arr)),
                       "mean": float(np.mean(hi_arr)) if math.isfinite(float(np.mean(hi_arr))) else None})
    insert_after(graph, after)
    graph.initializer.extend(inits)
    result.details = {"layers": layers, "mode": mode, "thresholds": sum(d["count"] for d in layers),
                      "bytes": sum(d["bytes"] for d in layers), "nodes_inserted": 4 * len(layers)}
    return result
