"""Range restriction: bound the outputs of non-linear functions so that a fault cannot push a huge
value (or NaN, or Inf) past them (seed paper, section IV-B; Chen et al., DSN 2021).

Three steps, in the order a user runs them:

1. ``find_range_sites(model, kinds, extra)`` marks the activation tensors to protect (pure, reads the
   graph only). Softmax, Sigmoid and Tanh have fixed bounds; GELU, ReLU and LayerNorm outputs need
   calibration. Each kind has its own finder in ``FINDERS``; what a finder looked at and left alone
   is reported with a reason in ``RangeSites.skipped``.
2. ``onnxft.campaigns.calibrate_ranges.calibrate_ranges`` runs the model on calibration data and
   returns plain ``{tensor: (min, max)}``; ``range_bounds`` / ``site_bounds`` turn that into bounds.
3. ``restrict_ranges(model, bounds, mode)`` inserts the restriction after each tensor (a pure pass).

The output graph is standard ONNX at the model's own opset (9 or later), every inserted node has
the role ``protection`` (see ``onnxft.graph.roles``), and inside the bounds the restriction is
the identity, so fault-free outputs are bit-identical to the original's. See docs/ranges.md.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..graph.edit import default_opset, insert_after, producer_index
from ..graph.roles import PROTECTION, role_of, set_role
from ..runtime.model_io import external_data_dir
from .decompose import _subgraphs, constant_value
from .result import PassResult

__all__ = ["RangeSite", "RangeSites", "RangeError", "find_range_sites", "range_bounds", "site_bounds",
           "restrict_ranges", "KINDS", "DEFAULT_KINDS", "MODES", "RULES", "FINDERS", "GELU_MIN",
           "RANGE_KEY"]

DEFAULT_KINDS = ("softmax", "gelu")
KINDS = ("softmax", "gelu", "relu", "layernorm", "sigmoid", "tanh", "quantized")
MODES = ("clamp", "zero")
RULES = ("widen", "paper")
MIN_OPSET = 9  # IsNaN and Where
RANGE_KEY = "onnxft.range_site"  # metadata on inserted nodes: the tensor they restrict

# min over x of x * Phi(x), at x = -0.75179; the tanh approximation's minimum is -0.17004.
GELU_MIN = -0.17004

from ..graph.edit import DEFAULT_DOMAINS as _DEFAULT_DOMAINS  # noqa: E402
_FLOAT_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class RangeError(ValueError):
    """A user-facing problem with the model or the bounds (one clear line)."""


@dataclass(frozen=True)
class RangeSite:
    """One activation tensor to restrict.

    ``tensor``: the activation's output; ``kind``: softmax, gelu, relu, layernorm, sigmoid or tanh;
    ``nodes``: names of the nodes that compute it (the whole matched pattern for a decomposed GELU or
    LayerNorm); ``fixed``: the function's own bounds, or None when they come from calibration;
    ``known_min``: the function's own minimum where it has one but no fixed maximum (GELU, ReLU).
    """

    tensor: str
    kind: str
    nodes: tuple[str, ...]
    fixed: tuple[float, float] | None = None
    known_min: float | None = None
    known_range: tuple[float, float] | None = None  # always inside the bounds (a QuantizeLinear's range)


class FoundSites(list):
    """Sites a pass found (each with a ``tensor``), in graph order, plus ``skipped``: (node or kind,
    reason) pairs. Shared by range restriction and clipped activations (``passes.clip``)."""

    def __init__(self, sites: Iterable = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(sites)
        self.skipped: list[tuple[str, str]] = list(skipped)

    @property
    def tensors(self) -> list[str]:
        return [s.tensor for s in self]


class RangeSites(FoundSites):
    """The range sites found (RangeSite) plus ``skipped``."""

    def needing_calibration(self) -> list[str]:
        return [s.tensor for s in self if s.fixed is None]


# ---------------------------------------------------------------------------------------------
# Graph index


class _Index:
    """Producers, consumers and constants of the main graph, built once per call."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        # Nodes an onnxft pass inserted (range checks, checksums) are never activations to restrict.
        self.nodes = [n for n in g.node if role_of(n) != PROTECTION]
        self.producers = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in set(_inputs_with_subgraphs(n)):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        inputs = {i.name for i in g.input}
        self.inits = {t.name: t for t in g.initializer if t.name not in inputs}
        self.external_dir = external_data_dir(model)

    def const(self, name: str) -> np.ndarray | None:
        return constant_value(name, self.inits, self.producers, self.external_dir)

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.number):
            return None
        return float(v.reshape(()))

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, if exactly one does and it is not also a graph output."""
        cons = self.consumers.get(name, [])
        return cons[0] if len(cons) == 1 and name not in self.outputs else None


def _inputs_with_subgraphs(node: onnx.NodeProto):
    yield from (i for i in node.input if i)
    for sub in _subgraphs(node):  # outer-scope names a subgraph reads count as this node's inputs
        for n in sub.node:
            yield from _inputs_with_subgraphs(n)


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _same(a: onnx.NodeProto | None, b: onnx.NodeProto) -> bool:
    return a is not None and list(a.output) == list(b.output)


def _is(node: onnx.NodeProto | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and node.domain in _DEFAULT_DOMAINS


# ---------------------------------------------------------------------------------------------
# Finders: one per kind. Each returns (sites, skipped).

Finder = Callable[[_Index, dict], "tuple[list[RangeSite], list[tuple[str, str]]]"]


def _single_op_finder(op_types: tuple[str, ...], kind: str, fixed=None, known_min=None,
                      domains: tuple[str, ...] = _DEFAULT_DOMAINS) -> Finder:
    def find(ix: _Index, state: dict):
        sites = [RangeSite(n.output[0], kind, (_label(n),), fixed, known_min)
                 for n in ix.nodes if n.op_type in op_types and n.domain in domains and n.output]
        return sites, []
    return find


def _find_softmax(ix: _Index, state: dict):
    sites, skipped = _single_op_finder(("Softmax",), "softmax", fixed=(0.0, 1.0))(ix, state)
    for n in ix.nodes:
        if _is(n, "LogSoftmax"):
            skipped.append((_label(n), "LogSoftmax output is unbounded below (log-probabilities); not restricted"))
    if not sites:
        skipped.append(("softmax", "no Softmax node in the main graph"))
    return sites, skipped


_FUSED_GELU = {("", "Gelu"), ("ai.onnx", "Gelu"), ("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu"),
               ("com.microsoft", "BiasGelu")}


def _find_gelu(ix: _Index, state: dict):
    sites, skipped = [], []
    for n in ix.nodes:
        if (n.domain, n.op_type) in _FUSED_GELU:
            sites.append(RangeSite(n.output[0], "gelu", (_label(n),), None, GELU_MIN))
    for n in ix.nodes:
        if _is(n, "Erf", "Tanh"):
            match = _match_gelu(ix, n)
            if isinstance(match, str):
                skipped.append((_label(n), f"{n.op_type} is not part of a GELU: {match}"))
            else:
                sites.append(match)
                state.setdefault("gelu_inner", set()).update(match.nodes)
    if not sites:
        skipped.append(("gelu", "no GELU (fused Gelu, Erf form or Tanh form) in the main graph"))
    return sites, skipped


def _find_tanh(ix: _Index, state: dict):
    inner = state.get("gelu_inner", set())
    sites, skipped = [], []
    for n in ix.nodes:
        if _is(n, "Tanh"):
            if _label(n) in inner:
                skipped.append((_label(n), "Tanh inside a GELU; the GELU output is restricted instead"))
            else:
                sites.append(RangeSite(n.output[0], "tanh", (_label(n),), (-1.0, 1.0)))
    return sites, skipped


def _find_layernorm(ix: _Index, state: dict):
    sites, skipped = [], []
    for n in ix.nodes:
        if _is(n, "LayerNormalization") or (n.domain == "com.microsoft" and n.op_type == "SkipLayerNormalization"):
            sites.append(RangeSite(n.output[0], "layernorm", (_label(n),)))
    # Decomposed: Div(x - mean, Sqrt(ReduceMean(...) + eps)) [* scale] [+ bias]
    for n in ix.nodes:
        if not _is(n, "Sqrt"):
            continue
        add = ix.producers.get(n.input[0])
        if not (_is(add, "Add") and any(_is(ix.producers.get(i), "ReduceMean") for i in add.input)
                and any(ix.scalar(i) is not None for i in add.input)):
            continue
        div = ix.sole_consumer(n.output[0])
        if not (_is(div, "Div") and div.input[1] == n.output[0]):
            skipped.append((_label(n), "LayerNorm-like Sqrt(ReduceMean + eps) not followed by one Div"))
            continue
        chain = [add, n, div]
        for op in ("Mul", "Add"):
            nxt = ix.sole_consumer(chain[-1].output[0])
            if _is(nxt, op) and any(ix.const(i) is not None for i in nxt.input):
                chain.append(nxt)
        last = chain[-1]
        sites.append(RangeSite(last.output[0], "layernorm", tuple(_label(c) for c in chain)))
    return sites, skipped


# Ops whose output feeding a QuantizeLinear is arithmetic worth restricting. GEMMs are left out
# (ABFT covers them); data movement (Reshape, Transpose, Gather, ...) only copies values.
_QDQ_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sqrt", "Pow", "Exp", "Softmax", "LayerNormalization",
                   "Sigmoid", "Relu", "Gelu", "ReduceMean", "ReduceSum")


def _find_quantized(ix: _Index, state: dict):
    """QDQ models: every arithmetic float op whose output goes into a QuantizeLinear, bounded by
    the range that QuantizeLinear can represent, ``scale * (qmin - zp)`` to ``scale * (qmax - zp)``,
    or by the calibrated range where that is wider (the quantizer's calibration may have seen
    less than ours), both widened by alpha. QuantizeLinear already saturates, so ``clamp``
    changes almost nothing here; ``zero`` is the point: a value a fault pushed out of range
    becomes 0 instead of the largest representable value. Use a generous alpha (0.25) with
    ``zero``: on the sample ViT int8, test images exceed ranges calibrated on 256 images by up to
    5.5%, and a zeroed fault-free value changes the output."""
    sites, skipped = [], []
    for q in ix.nodes:
        if not _is(q, "QuantizeLinear") or len(q.input) < 2:
            continue
        src = ix.producers.get(q.input[0])
        if not _is(src, *_QDQ_ARITHMETIC):
            continue
        scale = ix.const(q.input[1])
        zp = ix.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None or scale.size != 1 or zp.size != 1:
            skipped.append((_label(q), "per-channel or non-constant quantization parameters"))
            continue
        info = np.iinfo(zp.dtype) if np.issubdtype(zp.dtype, np.integer) else None
        if info is None:
            skipped.append((_label(q), f"quantized type {zp.dtype} is not an integer type"))
            continue
        s, z = float(scale.reshape(())), float(zp.reshape(()))
        lo, hi = s * (info.min - z), s * (info.max - z)
        sites.append(RangeSite(q.input[0], "quantized", (_label(src),), None, None, (lo, hi)))
    if not sites:
        skipped.append(("quantized", "no arithmetic op feeds a QuantizeLinear (not a QDQ model)"))
    return sites, skipped


FINDERS: dict[str, Finder] = {
    "softmax": _find_softmax,
    "gelu": _find_gelu,
    "relu": _single_op_finder(("Relu", "LeakyRelu", "Clip", "PRelu", "Elu", "Selu"), "relu"),
    "layernorm": _find_layernorm,
    "sigmoid": _single_op_finder(("Sigmoid", "HardSigmoid"), "sigmoid", fixed=(0.0, 1.0)),
    "tanh": _find_tanh,
    "quantized": _find_quantized,
}


def find_range_sites(model: onnx.ModelProto, kinds: Iterable[str] = DEFAULT_KINDS,
                     extra: Iterable[str] = ()) -> RangeSites:
    """Activation tensors of the main graph to restrict, in graph order, one per tensor.

    ``kinds`` and ``extra`` together name the kinds to look for (``extra`` is the by-flag set:
    relu, layernorm, sigmoid, tanh); ``"all"`` in either means every kind (Ranger-style).
    """
    wanted = list(kinds) + list(extra)
    if "all" in wanted:
        wanted = list(KINDS)
    unknown = [k for k in wanted if k not in FINDERS]
    if unknown:
        raise RangeError(f"unknown range kind {unknown[0]!r}; choose from {', '.join(KINDS)} or all")
    ix = _Index(model)
    state: dict = {}
    found: dict[str, RangeSite] = {}
    skipped: list[tuple[str, str]] = []
    # GELU first, so that the Tanh finder knows which Tanh nodes are GELU internals.
    for kind in sorted(dict.fromkeys(wanted), key=lambda k: k != "gelu"):
        sites, why = FINDERS[kind](ix, state)
        skipped += why
        for s in sites:
            if s.tensor in found:
                skipped.append((s.nodes[-1], f"{s.tensor} is already restricted as {found[s.tensor].kind}"))
            else:
                found[s.tensor] = s
    for n in model.graph.node:
        for sub in _subgraphs(n):
            if any(x.op_type in ("Softmax", "Gelu", "Erf", "Tanh", "Relu", "LayerNormalization") for x in sub.node):
                skipped.append((_label(n), "activations inside subgraphs (If/Loop/Scan bodies) are not restricted"))
                break
    restricted = {i for n in model.graph.node if any(p.key == RANGE_KEY for p in n.metadata_props) for i in n.input}
    for t in [t for t in found if t in restricted]:
        skipped.append((found.pop(t).nodes[-1], f"{t} is already range-restricted"))
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return RangeSites(sorted(found.values(), key=lambda s: order.get(s.tensor, -1)), skipped)


# ---------------------------------------------------------------------------------------------
# GELU matching: find Erf/Tanh, check its argument numerically, walk to the final Mul.

_SAMPLE_X = np.linspace(-4.0, 4.0, 17)
_EXPECTED_ARG = {
    "Erf": lambda x: x / math.sqrt(2.0),
    "Tanh": lambda x: math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3),
}
_ARITH = {
    "Mul": lambda a, b: a * b, "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
    "Div": lambda a, b: a / b, "Pow": lambda a, b: np.power(a, b),
}
_MAX_ARG_NODES = 8


def _arg_expression(ix: _Index, tensor: str):
    """The elementwise expression computing ``tensor`` from one non-constant tensor ``x``:
    (x, nodes, evaluate) or a reason string."""
    nodes: list[onnx.NodeProto] = []
    leaves: set[str] = set()

    def walk(name: str):
        if ix.const(name) is not None:
            return
        p = ix.producers.get(name)
        if _is(p, *_ARITH) and len(nodes) < _MAX_ARG_NODES and _leaf_free(p):
            nodes.append(p)
            for i in p.input:
                walk(i)
        else:
            leaves.add(name)

    def _leaf_free(p):  # x itself feeds the outer product, so stop at tensors read by several nodes
        return len(ix.consumers.get(p.output[0], [])) == 1 or p.output[0] == tensor

    walk(tensor)
    if len(leaves) != 1:
        return f"its argument depends on {len(leaves)} tensors, a GELU's on one"
    x = leaves.pop()

    def evaluate(xs: np.ndarray) -> np.ndarray:
        memo = {x: xs}

        def val(name):
            if name not in memo:
                c = ix.const(name)
                if c is not None:
                    memo[name] = c.astype(np.float64)
                else:
                    p = ix.producers[name]
                    memo[name] = _ARITH[p.op_type](val(p.input[0]), val(p.input[1]))
            return memo[name]
        return val(tensor)

    return x, nodes, evaluate


def _product_leaves(ix: _Index, node: onnx.NodeProto, keep: set[str], depth: int = 0):
    """Flatten a tree of Mul (and Div by a constant) into (tensor leaves, constant factor, nodes)."""
    tensors, factor, nodes = [], 1.0, [node]
    for pos, name in enumerate(node.input):
        c = ix.scalar(name)
        if c is not None:
            factor *= (1.0 / c) if (node.op_type == "Div" and pos == 1) else c
            continue
        if node.op_type == "Div" and pos == 1:
            return None
        p = ix.producers.get(name)
        if name not in keep and depth < 4 and _is(p, "Mul", "Div") and _same(ix.sole_consumer(name), node):
            sub = _product_leaves(ix, p, keep, depth + 1)
            if sub is None:
                return None
            tensors += sub[0]
            factor *= sub[1]
            nodes = sub[2] + nodes
        else:
            tensors.append(name)
    return tensors, factor, nodes


def _match_gelu(ix: _Index, fn: onnx.NodeProto) -> RangeSite | str:
    arg = _arg_expression(ix, fn.input[0])
    if isinstance(arg, str):
        return arg
    x, arg_nodes, evaluate = arg
    with np.errstate(all="ignore"):
        got = evaluate(_SAMPLE_X)
    want = _EXPECTED_ARG[fn.op_type](_SAMPLE_X)
    if np.shape(got) != np.shape(want) or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
        form = "x/sqrt(2)" if fn.op_type == "Erf" else "sqrt(2/pi)*(x + 0.044715*x^3)"
        return f"its argument is not {form}"
    one_plus = ix.sole_consumer(fn.output[0])
    if _is(one_plus, "QuantizeLinear"):
        return ("its output is quantized (QDQ model): GELUs in QDQ form are not matched; each QuantizeLinear "
                "already saturates its value to the quantized range")
    if not (_is(one_plus, "Add") and any(ix.scalar(i) is not None and abs(ix.scalar(i) - 1.0) < 1e-6
                                         for i in one_plus.input)):
        return "its output is not only read by an Add of 1"
    u = one_plus.output[0]
    cur = ix.sole_consumer(u)
    for _ in range(3):
        if not _is(cur, "Mul", "Div"):
            break
        leaves = _product_leaves(ix, cur, {x, u})
        if leaves is not None:
            tensors, factor, mul_nodes = leaves
            if sorted(tensors) == sorted([x, u]) and abs(factor - 0.5) < 1e-6:
                names = tuple(_label(n) for n in [*reversed(arg_nodes), fn, one_plus, *mul_nodes])
                return RangeSite(cur.output[0], "gelu", names, None, GELU_MIN)
        cur = ix.sole_consumer(cur.output[0])
    return "no Mul chain computing 0.5 * x * (1 + ...) follows it"


# ---------------------------------------------------------------------------------------------
# Bounds


def range_bounds(stats: Mapping[str, tuple[float, float]], alpha: float = 0.02,
                 rule: str = "widen") -> dict[str, tuple[float, float]]:
    """Bounds from calibrated ``{tensor: (min, max)}``.

    ``widen`` (default): ``(min - a|min|, max + a|max|)``, a margin of ``a`` times the magnitude
    on each side, so the bounds contain every calibrated value whatever the signs.
    ``paper``: the seed paper's ``((1+a) min, (1-a) max)`` literally; it trims the largest
    calibrated values (the paper's intent: "filter out large outputs with very limited number"), so
    fault-free outputs on the calibration data are no longer exactly the original's.
    """
    if rule not in RULES:
        raise RangeError(f"unknown bound rule {rule!r}; choose from {', '.join(RULES)}")
    if not (0.0 <= alpha < 1.0):
        raise RangeError(f"alpha must be in [0, 1), got {alpha}")
    out = {}
    for tensor, (lo, hi) in stats.items():
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise RangeError(f"calibrated range of {tensor!r} is not a finite interval: ({lo}, {hi})")
        if rule == "widen":
            out[tensor] = (lo - alpha * abs(lo), hi + alpha * abs(hi))
        else:
            a, b = (1 + alpha) * lo, (1 - alpha) * hi
            out[tensor] = (min(a, b), max(a, b))
    return out


def site_bounds(sites: Iterable[RangeSite], stats: Mapping[str, tuple[float, float]] | None = None,
                alpha: float = 0.02, rule: str = "widen") -> dict[str, tuple[float, float]]:
    """Bounds for every site: the fixed ones, and calibrated ones from ``stats``.

    Under ``widen`` a site whose function has a known minimum (GELU about -0.17, ReLU 0) takes that
    minimum, widened by ``alpha``, as its lower bound: calibration data that never reached the
    GELU's dip would otherwise give a lower bound that clips correct values on other inputs.
    """
    stats = stats or {}
    sites = list(sites)
    missing = [s.tensor for s in sites if s.fixed is None and s.tensor not in stats]
    if missing:
        raise RangeError(f"no calibrated range for {missing[0]!r} ({len(missing)} sites need calibration data)")
    calibrated = range_bounds({s.tensor: stats[s.tensor] for s in sites if s.fixed is None}, alpha, rule)
    out = {}
    for s in sites:
        if s.fixed is not None:
            out[s.tensor] = s.fixed
            continue
        lo, hi = calibrated[s.tensor]
        if rule == "widen" and s.known_min is not None:
            lo = s.known_min - alpha * abs(s.known_min)
            hi = max(hi, lo)
        if s.known_range is not None:
            k_lo, k_hi = s.known_range
            lo, hi = min(lo, k_lo - alpha * abs(k_lo)), max(hi, k_hi + alpha * abs(k_hi))
        out[s.tensor] = (lo, hi)
    return out


# ---------------------------------------------------------------------------------------------
# The pass


@dataclass
class _Names:
    used: set[str] = field(default_factory=set)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = set()

    def visit(g):
        for n in g.node:
            used.add(n.name)
            used.update(n.input)
            used.update(n.output)
            for sub in _subgraphs(n):
                visit(sub)
        for coll in (g.input, g.output, g.value_info):
            used.update(v.name for v in coll)
        used.update(t.name for t in g.initializer)
    visit(model.graph)
    return used


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # custom ops, >2 GB: fall back to what the model declares
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _outward(lo: float, hi: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The bounds in the tensor's dtype, rounded outward so they still contain [lo, hi]."""
    a, b = dtype(lo), dtype(hi)
    if float(a) > lo:
        a = np.nextafter(a, dtype(-np.inf))
    if float(b) < hi:
        b = np.nextafter(b, dtype(np.inf))
    return np.array(a, dtype), np.array(b, dtype)


def _restriction_nodes(mode: str, opset: int, raw: str, out: str, lo: str, hi: str, fill: str,
                       lo_v: float, hi_v: float, lo_open: str, hi_open: str, tmp) -> list[onnx.NodeProto]:
    """The nodes restricting ``raw`` into ``out`` (names of the constants given).

    clamp: Where(IsNaN(x), fill, Clip(x, lo, hi)): +-Inf and huge values go to the bounds, NaN to
    ``fill``. zero: Where(Clip(x, lo, hi) == x, x, 0): out of range, +-Inf and NaN (NaN != NaN) give
    0. Before opset 11 Equal takes no floats and Clip takes its bounds as attributes: zero mode uses
    x > prev(lo) and x < next(hi), strict comparisons with the neighbouring floats (= inclusive).
    """
    def clip(dst):
        if opset >= 11:
            return helper.make_node("Clip", [raw, lo, hi], [dst])
        return helper.make_node("Clip", [raw], [dst], min=lo_v, max=hi_v)

    if mode == "clamp":
        c, nan = tmp("clipped"), tmp("isnan")
        return [clip(c), helper.make_node("IsNaN", [raw], [nan]), helper.make_node("Where", [nan, fill, c], [out])]
    if opset >= 11:
        c, inside = tmp("clipped"), tmp("inside")
        return [clip(c), helper.make_node("Equal", [c, raw], [inside]),
                helper.make_node("Where", [inside, raw, fill], [out])]
    above, below, inside = tmp("above_lo"), tmp("below_hi"), tmp("inside")
    return [helper.make_node("Greater", [raw, lo_open], [above]), helper.make_node("Less", [raw, hi_open], [below]),
            helper.make_node("And", [above, below], [inside]), helper.make_node("Where", [inside, raw, fill], [out])]


def restrict_ranges(model: onnx.ModelProto, bounds: Mapping[str, tuple[float, float]], mode: str = "clamp",
                    sites: Iterable[RangeSite] | None = None) -> PassResult:
    """Insert a range restriction after each tensor of ``bounds`` (``{tensor: (lo, hi)}``).

    ``mode``: ``clamp`` (values go to the nearest bound; NaN to 0, or to the bound nearest 0 when 0
    is outside [lo, hi]) or ``zero`` (the paper's: values outside [lo, hi], NaN and Inf become 0).
    The producer's output is renamed ``<tensor>/unrestricted`` and the last restriction node writes
    ``<tensor>``, so every consumer (subgraphs included) reads the restricted value and graph
    output names do not change. ``sites`` (from ``find_range_sites``) only labels the report and
    carries its skipped entries over. The input model is not modified.
    """
    if mode not in MODES:
        raise RangeError(f"unknown range mode {mode!r}; choose from {', '.join(MODES)}")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise RangeError(f"range restriction needs default opset >= {MIN_OPSET} (IsNaN, Where); the model has "
                         f"{opset}; upgrade it with onnx.version_converter first")
    kinds = {s.tensor: s.kind for s in sites or ()}
    result = PassResult(model=copy.deepcopy(model), skipped=list(getattr(sites, "skipped", [])))
    graph = result.model.graph
    producers = producer_index(graph)
    types = _elem_types(model)
    names = _Names(_used_names(model))
    inits: list[onnx.TensorProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}
    details = {}
    for tensor, (lo, hi) in bounds.items():
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise RangeError(f"bounds for {tensor!r} must be finite with lo <= hi, got ({lo}, {hi})")
        if tensor not in producers:
            result.skipped.append((tensor, "not produced by a node of the main graph (graph input, "
                                           "initializer, or unknown name)"))
            continue
        elem = types.get(tensor)
        if elem not in _FLOAT_NP:
            result.skipped.append((tensor, f"element type {TensorProto.DataType.Name(elem) if elem else 'unknown'} "
                                           "is not float, float16 or double"))
            continue
        dtype = _FLOAT_NP[elem]
        producer = graph.node[producers[tensor]]
        raw = names.fresh(f"{tensor}/unrestricted")
        producer.output[list(producer.output).index(tensor)] = raw
        lo_a, hi_a = _outward(lo, hi, dtype)
        fill_v = 0.0 if mode == "zero" else min(max(0.0, float(lo_a)), float(hi_a))

        def const(value, suffix):
            name = names.fresh(f"{tensor}/range_{suffix}")
            inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
            return name

        if mode == "zero" and opset < 11:
            lo_c = hi_c = ""
            lo_open = const(np.nextafter(lo_a, dtype(-np.inf)), "lo_open")
            hi_open = const(np.nextafter(hi_a, dtype(np.inf)), "hi_open")
        else:
            lo_c, hi_c = (const(lo_a, "lo"), const(hi_a, "hi")) if opset >= 11 else ("", "")
            lo_open = hi_open = ""
        fill = const(fill_v, "fill")
        nodes = _restriction_nodes(mode, opset, raw, tensor, lo_c, hi_c, fill, float(lo_a), float(hi_a),
                                   lo_open, hi_open, lambda s: names.fresh(f"{tensor}/range_{s}"))
        base = producer.name or tensor
        for n in nodes:
            n.name = names.fresh(f"{base}/range/{n.op_type}")
            set_role(n, PROTECTION)
            n.metadata_props.add(key=RANGE_KEY, value=tensor)
        after.setdefault(producers[tensor], []).extend(nodes)
        kind = kinds.get(tensor, "range")
        result.inserted.append(f"{kind} {tensor}: [{float(lo_a):.6g}, {float(hi_a):.6g}] {mode} -> {len(nodes)} nodes")
        details[tensor] = {"kind": kind, "lo": float(lo_a), "hi": float(hi_a), "nodes": len(nodes)}

    insert_after(graph, after)
    graph.initializer.extend(inits)
    result.details = {"ranges": details, "mode": mode,
                      "nodes_inserted": sum(d["nodes"] for d in details.values())}
    return result
