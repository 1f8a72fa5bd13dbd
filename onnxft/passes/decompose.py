"""Decompose fused ONNX operators into primitive standard ONNX ops.

onnxft injects faults into every arithmetic operation of a model. A fused
operator such as ``LayerNormalization`` or ``Softmax`` hides its multiplies,
adds, divides and transcendental calls inside one kernel, so a fault injector
working at node granularity would see only one site. This pass rewrites those
operators into chains of primitive default-domain ONNX ops (``Mul``, ``Add``,
``Sub``, ``Div``, ``Exp``, ``Sqrt``, ``ReduceMean`` ...), each of which then
becomes its own fault site. The rewrites follow what real kernels do (e.g.
softmax keeps the max-subtraction; a square is ``x*x``, never ``Pow``).

What is inserted, per original node:

* ``Softmax`` -> ReduceMax, Sub, Exp, ReduceSum, Div.
* ``LogSoftmax`` -> ReduceMax, Sub, Exp, ReduceSum, Log, Sub.
* ``LayerNormalization`` -> ReduceMean, Sub, Mul (x*x), ReduceMean, Add(eps),
  Sqrt, Div, Mul(scale), Add(bias) (plus Cast nodes when ``stash_type`` differs
  from the input type).
* ``Gelu`` -> Div/Erf/Add/Mul/Mul (exact) or Mul/Mul/Mul/Add/Mul/Tanh/Add/Mul/Mul
  (``approximate='tanh'``).
* ``BatchNormalization`` (inference form, constant parameters) -> Mul + Add with
  the per-channel factors ``a = scale/sqrt(var+eps)`` and ``c = B - mean*a``
  precomputed offline as new initializers shaped ``[C, 1, ...]``.
* ``Sigmoid`` -> Neg, Exp, Add(1), Reciprocal.
* ``HardSigmoid`` -> Mul(alpha), Add(beta), Clip(0, 1).
* ``HardSwish`` -> Mul(1/6), Add(0.5), Clip(0, 1), Mul(x).
* ``Gemm`` -> [Transpose] MatMul [Mul(alpha)] [Add(beta*C)]; transposes and the
  ``beta*C`` product are done offline when the operand is a constant initializer.
* ``LSTM``, ``GRU``, ``RNN`` -> per direction, MatMul(X, W^T) and the input bias Add for all
  steps, then a ``Loop`` over the time steps whose body is the cell in primitives (MatMul(H, R^T),
  gate Adds, Split, sigmoid as above, Tanh, the Mul/Add cell update); see docs/fault_model.md,
  "Recurrent ops".
* ``Einsum`` in batched-matmul form (``bhid,bhjd->bhij``, ``bid,de->bie``...) -> [Transpose]
  [Reshape] of each operand, MatMul, [Reshape] [Transpose]; other equations are skipped with the
  reason (``einsum_as_matmul``).

The replacement's last node writes the original output tensor name, so
consumers are untouched; replacement nodes are inserted where the original
node was, keeping the graph topologically sorted. New nodes are named
``<original node name>/<OpType>`` and carry ``metadata_props``
``onnxft.origin`` (original op type) and ``onnxft.origin_node`` (original node
name). New tensors are named ``<original output>/<suffix>``. Matching nodes
inside If/Loop/Scan bodies are rewritten too (their new initializers go to the main graph).

The input model must use default-domain opset >= 18 (Reduce* ops take their
axes as an input); upgrade with ``onnx.version_converter`` first.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.external_data_helper import uses_external_data

from ..runtime.model_io import external_data_dir
from .result import PassResult
from ..graph.edit import default_opset

__all__ = ["decompose", "HANDLERS", "ORIGIN_KEY", "ORIGIN_NODE_KEY", "MIN_OPSET"]

ORIGIN_KEY = "onnxft.origin"
ORIGIN_NODE_KEY = "onnxft.origin_node"
MIN_OPSET = 18

from ..graph.edit import DEFAULT_DOMAINS as _DEFAULT_DOMAINS  # noqa: E402
_ROLE_KEY = "onnxft.role"  # graph.roles.ROLE_KEY: nodes that harden inserted
_FLOAT_NP = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
}


class SkipNode(Exception):
    """Raised by a handler that cannot rewrite its node; the message is the reason."""


@dataclass
class Replacement:
    """What a handler returns: nodes replacing the original (in topological order),
    new initializers, and notes (e.g. assumptions) to append to the inserted line."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)  # ranks shape inference cannot find


class RewriteContext:
    """Model-wide facts the handlers need: unique names, constants, types, usage."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.used_names: set[str] = set()
        self.consumed: set[str] = {o.name for o in graph.output}
        for g in _all_graphs(graph):
            for n in g.node:
                self.used_names.add(n.name)
                self.used_names.update(n.output)
                self.used_names.update(n.input)
                self.consumed.update(i for i in n.input if i)
            for coll in (g.input, g.output, g.value_info):
                self.used_names.update(v.name for v in coll)
            self.used_names.update(t.name for t in g.initializer)
        graph_inputs = {i.name for i in graph.input}
        # An initializer that is also a graph input is only a default: not constant.
        self.constants = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
        # Exporters also give weights as Constant nodes, or through Identity (torch shares equal
        # initializers that way, e.g. BatchNorm running_mean = Identity(bias)).
        self.producers = {o: n for n in graph.node for o in n.output if n.op_type in ("Constant", "Identity")}
        self.external_dir = external_data_dir(model)
        self.types: dict[str, onnx.TypeProto] = {}
        self.shape_inference_error: str | None = None
        try:
            inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc:  # custom ops, >2 GB models ...: fall back to what is declared
            self.shape_inference_error = f"{type(exc).__name__}: {exc}"
            inferred = model
        for g in _all_graphs(inferred.graph):
            for coll in (g.input, g.output, g.value_info):
                for vi in coll:
                    if vi.type.HasField("tensor_type") and (g is inferred.graph or vi.name not in self.types):
                        self.types[vi.name] = vi.type

        for t in graph.initializer:
            self.types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))

    def fresh(self, base: str) -> str:
        """A name not yet used anywhere in the model, reserved on return."""
        name, i = base, 1
        while name in self.used_names:
            name = f"{base}_{i}"
            i += 1
        self.used_names.add(name)
        return name

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.elem_type:
            return None
        return t.tensor_type.elem_type

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def const_array(self, name: str) -> np.ndarray | None:
        """Value of ``name`` if it is constant: an initializer of the main graph (not a graph
        input), a ``Constant`` node, or an ``Identity`` of one of those."""
        return constant_value(name, self.constants, self.producers, self.external_dir)

    def is_used(self, name: str) -> bool:
        return bool(name) and name in self.consumed

    def builder(self, node: onnx.NodeProto) -> "_Builder":
        return _Builder(self, node)


class _Builder:
    """Accumulates one node's replacement; nothing touches the model until commit."""

    def __init__(self, ctx: RewriteContext, node: onnx.NodeProto) -> None:
        self.ctx = ctx
        self.node = node
        self.origin_name = _node_label(node)
        self.out = node.output[0]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.notes: list[str] = []

    def tensor(self, suffix: str) -> str:
        return self.ctx.fresh(f"{self.out}/{suffix}")

    def op(self, op_type: str, inputs: list[str], suffix: str | None = None, **attrs) -> str:
        out = self.tensor(suffix or op_type.lower())
        n = helper.make_node(op_type, inputs, [out], name=self.ctx.fresh(f"{self.origin_name}/{op_type}"), **attrs)
        for k, v in ((ORIGIN_KEY, self.node.op_type), (ORIGIN_NODE_KEY, self.origin_name)):
            e = n.metadata_props.add()
            e.key, e.value = k, v
        self.nodes.append(n)
        return out

    def init(self, array: np.ndarray, suffix: str) -> str:
        name = self.tensor(suffix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value: float, dtype: type, suffix: str) -> str:
        return self.init(np.array(value, dtype=dtype), suffix)

    def float_dtype(self, name: str) -> type:
        """numpy float type of tensor ``name``; float32 (noted) if unknown."""
        et = self.ctx.elem_type(name)
        if et is None:
            self.notes.append(f"elem type of {name!r} unknown, assumed float32")
            return np.float32
        if et not in _FLOAT_NP:
            raise SkipNode(f"input {name!r} has elem type {TensorProto.DataType.Name(et)}; "
                           "only float, float16 and double are handled")
        return _FLOAT_NP[et]

    def finish(self, final: str) -> Replacement:
        """Rename the final tensor to the original output name and package the result."""
        if not self.nodes:
            raise SkipNode("handler produced no nodes")
        if final != self.out:
            for n in self.nodes:
                for i, name in enumerate(n.input):
                    if name == final:
                        n.input[i] = self.out
                for i, name in enumerate(n.output):
                    if name == final:
                        n.output[i] = self.out
        return Replacement(self.nodes, self.inits, self.notes)


Handler = Callable[[onnx.NodeProto, RewriteContext], Replacement]


# ----------------------------------------------------------------------------- helpers

_MAX_EXTERNAL_CONST = 64 << 20  # bytes: larger weights kept on disk are not read into the pass


def constant_value(name: str, inits: dict, producers: dict, external_dir: str | None = None,
                   depth: int = 0) -> np.ndarray | None:
    """Value of tensor ``name`` if it is constant, else None.

    ``inits``: constant initializers by name; ``producers``: node producing each tensor (only
    ``Constant`` and ``Identity`` nodes matter). Weights kept in external data (models over
    2 GB, see ``runtime.model_io``) are read from ``external_dir`` when small, else treated as
    non-constant (the handlers then fall back to run-time ops).
    """
    t = inits.get(name)
    if t is None:
        n = producers.get(name)
        if n is None or depth > 16:
            return None
        if n.op_type == "Identity" and n.domain in _DEFAULT_DOMAINS:
            return constant_value(n.input[0], inits, producers, external_dir, depth + 1)
        if n.op_type != "Constant" or n.domain not in _DEFAULT_DOMAINS or len(n.attribute) != 1:
            return None
        a = n.attribute[0]
        if a.name == "value":
            t = a.t
        elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = helper.get_attribute_value(a)
            return np.array(v, dtype=np.float32 if "float" in a.name else np.int64)
        else:
            return None
    if uses_external_data(t):
        nbytes = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
        if external_dir is None or nbytes > _MAX_EXTERNAL_CONST:
            return None
        return numpy_helper.to_array(t, base_dir=external_dir)
    return numpy_helper.to_array(t)


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for g in _subgraphs(n):
            yield from _all_graphs(g)


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "")
    return f"{node.op_type}({out})"


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _opt_input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _check_extra_outputs(node: onnx.NodeProto, ctx: RewriteContext, what: str) -> None:
    used = [o for o in node.output[1:] if ctx.is_used(o)]
    if used:
        raise SkipNode(f"optional output(s) {used} ({what}) are used")


# ----------------------------------------------------------------------------- handlers

def _softmax_common(node: onnx.NodeProto, ctx: RewriteContext, log: bool) -> Replacement:
    b = ctx.builder(node)
    x = node.input[0]
    axes = b.init(np.array([_attr(node, "axis", -1)], dtype=np.int64), "axes")
    m = b.op("ReduceMax", [x, axes], "max", keepdims=1)
    d = b.op("Sub", [x, m], "shifted")
    e = b.op("Exp", [d], "exp")
    s = b.op("ReduceSum", [e, axes], "sum", keepdims=1)
    if log:
        ls = b.op("Log", [s], "logsum")
        return b.finish(b.op("Sub", [d, ls], "out"))
    return b.finish(b.op("Div", [e, s], "out"))


def _softmax(node, ctx):
    return _softmax_common(node, ctx, log=False)


def _log_softmax(node, ctx):
    return _softmax_common(node, ctx, log=True)


def _layer_norm(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    _check_extra_outputs(node, ctx, "Mean/InvStdDev")
    b = ctx.builder(node)
    x, scale, bias = node.input[0], _opt_input(node, 1), _opt_input(node, 2)
    axis = _attr(node, "axis", -1)
    eps = _attr(node, "epsilon", 1e-5)
    stash = _attr(node, "stash_type", TensorProto.FLOAT)
    rank = ctx.rank(x)
    if axis >= 0:
        if rank is None:
            raise SkipNode(f"rank of {x!r} unknown (needed for non-negative axis={axis})")
        axes = list(range(axis, rank))
    else:
        axes = list(range(axis, 0))
    if rank is not None and not (-rank <= axis < rank):
        raise SkipNode(f"axis={axis} out of range for rank {rank}")
    xdt = b.float_dtype(x)
    x_type = {v: k for k, v in _FLOAT_NP.items()}[xdt]
    if stash not in _FLOAT_NP:
        raise SkipNode(f"stash_type {stash} not handled")
    axes_t = b.init(np.array(axes, dtype=np.int64), "axes")
    xs = x if stash == x_type else b.op("Cast", [x], "stash", to=stash)
    mean = b.op("ReduceMean", [xs, axes_t], "mean", keepdims=1)
    d = b.op("Sub", [xs, mean], "centered")
    sq = b.op("Mul", [d, d], "sq")
    var = b.op("ReduceMean", [sq, axes_t], "var", keepdims=1)
    ve = b.op("Add", [var, b.const(eps, _FLOAT_NP[stash], "eps")], "var_eps")
    std = b.op("Sqrt", [ve], "std")
    y = b.op("Div", [d, std], "normalized")
    if stash != x_type:
        y = b.op("Cast", [y], "normalized_cast", to=x_type)
    if scale:
        y = b.op("Mul", [y, scale], "scaled")
    if bias:
        y = b.op("Add", [y, bias], "biased")
    return b.finish(y)


def _gelu(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    b = ctx.builder(node)
    x = node.input[0]
    dt = b.float_dtype(x)
    approx = _attr(node, "approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    if approx == "none":
        s = b.op("Div", [x, b.const(math.sqrt(2.0), dt, "sqrt2")], "scaled")
        inner = b.op("Erf", [s], "erf")
    elif approx == "tanh":
        x2 = b.op("Mul", [x, x], "x2")
        x3 = b.op("Mul", [x2, x], "x3")
        c = b.op("Mul", [x3, b.const(0.044715, dt, "c")], "cubic")
        p = b.op("Add", [x, c], "poly")
        u = b.op("Mul", [p, b.const(math.sqrt(2.0 / math.pi), dt, "sqrt_2_over_pi")], "scaled")
        inner = b.op("Tanh", [u], "tanh")
    else:
        raise SkipNode(f"unknown approximate={approx!r}")
    one_plus = b.op("Add", [inner, b.const(1.0, dt, "one")], "one_plus")
    xm = b.op("Mul", [x, one_plus], "x_mul")
    return b.finish(b.op("Mul", [xm, b.const(0.5, dt, "half")], "out"))


def _batch_norm(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    if _attr(node, "training_mode", 0):
        raise SkipNode("training_mode=1")
    _check_extra_outputs(node, ctx, "running mean/var")
    b = ctx.builder(node)
    x = node.input[0]
    params = [ctx.const_array(n) for n in node.input[1:5]]
    if len(node.input) < 5 or any(p is None for p in params):
        raise SkipNode("scale, B, mean and var must all be constant initializers")
    rank = ctx.rank(x)
    if rank is None:
        raise SkipNode(f"rank of {x!r} unknown")
    if rank < 2:
        raise SkipNode(f"rank {rank} < 2")
    dt = b.float_dtype(x)
    eps = _attr(node, "epsilon", 1e-5)
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    a = scale / np.sqrt(var + eps)
    c = bias - mean * a
    shape = [a.size] + [1] * (rank - 2)
    m = b.op("Mul", [x, b.init(a.astype(dt).reshape(shape), "a")], "scaled")
    return b.finish(b.op("Add", [m, b.init(c.astype(dt).reshape(shape), "c")], "out"))


def _sigmoid(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    b = ctx.builder(node)
    x = node.input[0]
    dt = b.float_dtype(x)
    n = b.op("Neg", [x], "neg")
    e = b.op("Exp", [n], "exp")
    d = b.op("Add", [b.const(1.0, dt, "one"), e], "denom")
    return b.finish(b.op("Reciprocal", [d], "out"))


def _hard_sigmoid_chain(b: _Builder, x: str, alpha: float, beta: float, dt) -> str:
    m = b.op("Mul", [x, b.const(alpha, dt, "alpha")], "scaled")
    a = b.op("Add", [m, b.const(beta, dt, "beta")], "shifted")
    return b.op("Clip", [a, b.const(0.0, dt, "zero"), b.const(1.0, dt, "one")], "clipped")


def _hard_sigmoid(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    b = ctx.builder(node)
    x = node.input[0]
    dt = b.float_dtype(x)
    return b.finish(_hard_sigmoid_chain(b, x, _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5), dt))


def _hard_swish(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    b = ctx.builder(node)
    x = node.input[0]
    dt = b.float_dtype(x)
    hs = _hard_sigmoid_chain(b, x, 1.0 / 6.0, 0.5, dt)
    return b.finish(b.op("Mul", [x, hs], "out"))


def _gemm(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    b = ctx.builder(node)
    a_in, b_in, c_in = node.input[0], node.input[1], _opt_input(node, 2)
    alpha = _attr(node, "alpha", 1.0)
    beta = _attr(node, "beta", 1.0)

    def operand(name: str, trans: int, tag: str) -> str:
        if not trans:
            return name
        arr = ctx.const_array(name)
        if arr is not None:
            if arr.ndim != 2:
                raise SkipNode(f"constant {name!r} is not 2-D")
            return b.init(arr.T, f"{tag}_T")
        return b.op("Transpose", [name], f"{tag}_T", perm=[1, 0])

    lhs = operand(a_in, _attr(node, "transA", 0), "A")
    rhs = operand(b_in, _attr(node, "transB", 0), "B")
    y = b.op("MatMul", [lhs, rhs], "matmul")
    need_const = alpha != 1.0 or (c_in and beta not in (0.0, 1.0))
    dt = b.float_dtype(a_in) if need_const else None
    if alpha != 1.0:
        y = b.op("Mul", [y, b.const(alpha, dt, "alpha")], "alpha_mul")
    if c_in and beta == 0.0:
        b.notes.append("beta=0: C dropped")
    elif c_in:
        c_arr = ctx.const_array(c_in)
        if beta == 1.0:
            c_term = c_in
        elif c_arr is not None:
            c_term = b.init((c_arr.astype(np.float64) * beta).astype(c_arr.dtype), "beta_C")
        else:
            c_term = b.op("Mul", [c_in, b.const(beta, dt, "beta")], "beta_C")
        y = b.op("Add", [y, c_term], "out")
    return b.finish(y)


# ----------------------------------------------------------------------------- recurrent ops
#
# LSTM, GRU and RNN become a ``Loop`` over time steps whose body holds the cell's primitives, so
# that every gate product and cell update is a fault site (inject faults it per time step, see
# docs/fault_model.md, "Sites in control flow"). What runs once per sequence stays outside the
# loop, as in onnxruntime's kernels: X·W^T for all steps in one MatMul, plus the input bias.

_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_RNN_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_INT64_MIN = np.iinfo(np.int64).min


def _sigmoid_chain(b: "_Builder", x: str, dt, suffix: str) -> str:
    """1 / (1 + exp(-x)), as the Sigmoid handler decomposes it."""
    e = b.op("Exp", [b.op("Neg", [x], f"{suffix}_neg")], f"{suffix}_exp")
    return b.op("Reciprocal", [b.op("Add", [b.const(1.0, dt, "one"), e], f"{suffix}_denom")], suffix)


def _split(b: "_Builder", x: str, sizes: list[int], suffix: str, axis: int = 1) -> list[str]:
    """The blocks of ``x`` along ``axis`` (the gates of a cell). One Split rather than Slices:
    onnxruntime 1.31 fuses Slices that cover an axis into a Split and then splits the wrong axis
    inside a Loop body."""
    outs = [b.tensor(f"{suffix}{k}") for k in range(len(sizes))]
    n = helper.make_node("Split", [x, b.init(np.array(sizes, np.int64), f"{suffix}_sizes")], outs,
                         name=b.ctx.fresh(f"{b.origin_name}/Split"), axis=axis)
    for k, v in ((ORIGIN_KEY, b.node.op_type), (ORIGIN_NODE_KEY, b.origin_name)):
        n.metadata_props.add(key=k, value=v)
    b.nodes.append(n)
    return outs


def _index(b: "_Builder", d: int) -> str:
    """A 0-d int64 index (``_Builder.init`` would make it 1-d, and Gather would keep the axis)."""
    name = b.tensor("dir")
    b.inits.append(numpy_helper.from_array(np.array(d, np.int64), name))
    return name


def _direction_weight(b: "_Builder", name: str, d: int, tag: str) -> str:
    """W[d]^T (or R[d]^T): offline for a constant, else Gather + Transpose at run time."""
    arr = b.ctx.const_array(name)
    if arr is not None:
        return b.init(np.ascontiguousarray(arr[d].T), f"{tag}{d}_T")
    return b.op("Transpose", [b.op("Gather", [name, _index(b, d)], f"{tag}{d}", axis=0)],
                f"{tag}{d}_T", perm=[1, 0])


def _recurrent(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    kind = node.op_type
    gates = _RNN_GATES[kind]
    H = int(_attr(node, "hidden_size", 0))
    if H <= 0:
        raise SkipNode("hidden_size is missing")
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "reverse", "bidirectional"):
        raise SkipNode(f"unknown direction {direction!r}")
    dirs = [0, 1] if direction == "bidirectional" else [0]
    acts = [a.decode() if isinstance(a, bytes) else a for a in _attr(node, "activations", [])]
    if acts and acts != _RNN_ACTIVATIONS[kind] * len(dirs):
        raise SkipNode(f"activations {acts} are not supported (only the defaults {_RNN_ACTIVATIONS[kind]})")
    if _attr(node, "clip", None) is not None:
        raise SkipNode("clip is not supported")
    if kind == "LSTM" and _attr(node, "input_forget", 0):
        raise SkipNode("input_forget=1 is not supported")
    if kind == "LSTM" and _opt_input(node, 7):
        raise SkipNode("peepholes (input P) are not supported")
    layout = int(_attr(node, "layout", 0))
    x, w, r, bias = node.input[0], node.input[1], node.input[2], _opt_input(node, 3)
    seq_lens, h0, c0 = _opt_input(node, 4), _opt_input(node, 5), _opt_input(node, 6) if kind == "LSTM" else ""
    b = ctx.builder(node)
    dt = b.float_dtype(x)
    et = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}[dt]
    # Exporters inside If branches often leave these ranks unknown; the sites need them.
    declared = [helper.make_tensor_value_info(n, et, [None] * rank)
                for n, rank in ((x, 3), (w, 3), (r, 3), (bias, 2), (h0, 3), (c0, 3)) if n and ctx.rank(n) is None]
    if seq_lens:
        lens = ctx.const_array(seq_lens)
        t = ctx.types.get(x)
        steps = None
        if t is not None and t.tensor_type.HasField("shape") and len(t.tensor_type.shape.dim) == 3:
            dim = t.tensor_type.shape.dim[1 if layout else 0]
            steps = dim.dim_value if dim.HasField("dim_value") else None
        if lens is None or steps is None or not np.all(lens == steps):
            raise SkipNode("sequence_lens is given and not known to be the full length of every sequence "
                           "(only full-length sequences are supported)")
    if layout:  # [batch, seq, ...] -> [seq, batch, ...]
        x = b.op("Transpose", [x], "x_seq_major", perm=[1, 0, 2])
        h0 = b.op("Transpose", [h0], "h0_dir_major", perm=[1, 0, 2]) if h0 else ""
        c0 = b.op("Transpose", [c0], "c0_dir_major", perm=[1, 0, 2]) if c0 else ""
    steps = b.op("Squeeze", [b.op("Shape", [x], "x_shape", end=1)], "steps")
    zero_state = None
    if not h0 or (kind == "LSTM" and not c0):
        batch = b.op("Shape", [x], "batch", start=1, end=2)
        zero_state = b.op("ConstantOfShape", [b.op("Concat", [batch, b.init(np.array([H], np.int64), "hidden")],
                                                   "state_shape", axis=0)],
                          "zero_state", value=numpy_helper.from_array(np.zeros(1, dt)))
    ys, hs, cs = [], [], []
    for d in dirs:
        reverse = direction == "reverse" or d == 1
        wt = _direction_weight(b, w, d, "W")
        rt = _direction_weight(b, r, d, "R")
        xw = b.op("MatMul", [x, wt], f"xw{d}")
        wb = rb = None
        if bias:
            arr = ctx.const_array(bias)
            if arr is not None:
                wb = b.init(arr[d, :gates * H].astype(dt), f"Wb{d}")
                rb = b.init(arr[d, gates * H:].astype(dt), f"Rb{d}")
            else:
                bd = b.op("Gather", [bias, _index(b, d)], f"B{d}", axis=0)
                wb, rb = _split(b, bd, [gates * H, gates * H], f"WRb{d}_", axis=0)
            if kind in ("LSTM", "RNN"):  # both biases add to every gate: once per sequence
                xw = b.op("Add", [xw, b.op("Add", [wb, rb], f"bias{d}")], f"xwb{d}")
            else:  # GRU: the recurrent bias of the h gate sits inside the reset product
                xw = b.op("Add", [xw, wb], f"xwb{d}")
        state0 = []
        for init, tag in ((h0, "h"), (c0, "c")) if kind == "LSTM" else ((h0, "h"),):
            state0.append(b.op("Gather", [init, _index(b, d)], f"{tag}0_{d}", axis=0)
                          if init else zero_state)
        body, inits = _recurrent_body(ctx, node, kind, d, reverse, xw, rt, rb, steps, H, dt)
        b.inits.extend(inits)
        outs = [b.tensor(f"{t}_last{d}") for t in ("h", "c")[:len(state0)]] + [b.tensor(f"y{d}")]
        loop = helper.make_node("Loop", [steps, "", *state0], outs, name=ctx.fresh(f"{b.origin_name}/Loop{d}"),
                                body=body)
        for k, v in ((ORIGIN_KEY, node.op_type), (ORIGIN_NODE_KEY, b.origin_name)):
            loop.metadata_props.add(key=k, value=v)
        b.nodes.append(loop)
        y_d = outs[-1]
        if reverse:  # the loop ran from the last step back: put Y in time order
            y_d = b.op("Slice", [y_d, b.init(np.array([-1], np.int64), "last"),
                                 b.init(np.array([_INT64_MIN], np.int64), "before_first"),
                                 b.init(np.array([0], np.int64), "axis0"), b.init(np.array([-1], np.int64), "back")],
                       f"y{d}_in_order")
        axis1 = b.init(np.array([1], np.int64), "axis1")
        axis0 = b.init(np.array([0], np.int64), "axis0")
        ys.append(b.op("Unsqueeze", [y_d, axis1], f"y{d}_dir"))
        hs.append(b.op("Unsqueeze", [outs[0], axis0], f"h{d}_dir"))
        if kind == "LSTM":
            cs.append(b.op("Unsqueeze", [outs[1], axis0], f"c{d}_dir"))
    results = [ys, hs, cs]
    final = {}
    for k, parts in enumerate(results[:len(node.output)]):
        if not node.output[k] or not parts:
            continue
        t = parts[0] if len(parts) == 1 else b.op("Concat", parts, f"out{k}", axis=1 if k == 0 else 0)
        if layout:
            t = b.op("Transpose", [t], f"out{k}_batch_major", perm=[2, 0, 1, 3] if k == 0 else [1, 0, 2])
        final[t] = node.output[k]
    rep = _finish_many(b, final)
    # the bias halves: Split sizes from the main graph are not read by inference inside a subgraph
    declared += [helper.make_tensor_value_info(o, et, [None])
                 for n in b.nodes if n.op_type == "Split" for o in n.output]
    # and the results (Y [S, D, B, H], Y_h and Y_c [D, B, H]), so that what follows keeps its sites
    declared += [helper.make_tensor_value_info(o, et, [None] * (4 if k == 0 else 3))
                 for k, o in enumerate(node.output) if o and ctx.rank(o) is None]
    rep.value_info.extend(declared)
    return rep


def _finish_many(b: "_Builder", final: dict) -> Replacement:
    """Rename each tensor of ``final`` to its original output name (``_Builder.finish`` for
    several outputs); an output that is a renamed input gets an Identity."""
    produced = {o for n in b.nodes for o in n.output}
    for t, out in final.items():
        if t not in produced:
            b.nodes.append(helper.make_node("Identity", [t], [out], name=b.ctx.fresh(f"{b.origin_name}/Identity")))
            continue
        for n in b.nodes:
            n.input[:] = [out if i == t else i for i in n.input]
            n.output[:] = [out if o == t else o for o in n.output]
    return Replacement(b.nodes, b.inits, b.notes)


def _recurrent_body(ctx: RewriteContext, node: onnx.NodeProto, kind: str, d: int, reverse: bool, xw: str, rt: str,
                    rb: str | None, steps: str, H: int, dt):
    """The Loop body of one direction, (iteration, condition, state...) -> (condition, state...,
    the new h as a scan output), and the constants it reads (for the main graph)."""
    c = ctx.builder(node)  # nodes of the body (its constants still go to the main graph)
    it, cond = ctx.fresh(f"{c.out}/iter{d}"), ctx.fresh(f"{c.out}/cond{d}")
    h = ctx.fresh(f"{c.out}/h{d}")
    state_in = [h]
    if kind == "LSTM":
        state_in.append(ctx.fresh(f"{c.out}/c{d}"))
    t = it
    if reverse:
        t = c.op("Sub", [c.op("Sub", [steps, _index(c, 1)], "last_step"), it], "t")
    x_t = c.op("Gather", [xw, t], f"x{d}_t", axis=0)
    if kind == "LSTM":
        g = c.op("Add", [x_t, c.op("MatMul", [h, rt], f"hr{d}")], f"gates{d}")
        i_pre, o_pre, f_pre, g_pre = _split(c, g, [H] * 4, f"iofg{d}_")
        i = _sigmoid_chain(c, i_pre, dt, f"i{d}")
        o = _sigmoid_chain(c, o_pre, dt, f"o{d}")
        f = _sigmoid_chain(c, f_pre, dt, f"f{d}")
        cand = c.op("Tanh", [g_pre], f"g{d}")
        c_new = c.op("Add", [c.op("Mul", [f, state_in[1]], f"fc{d}"), c.op("Mul", [i, cand], f"ig{d}")], f"c{d}_new")
        h_new = c.op("Mul", [o, c.op("Tanh", [c_new], f"c{d}_tanh")], f"h{d}_new")
        new_state = [h_new, c_new]
    elif kind == "GRU":
        lbr = int(_attr(node, "linear_before_reset", 0))
        x_zr, x_h = _split(c, x_t, [2 * H, H], f"x{d}_zr_h")
        if lbr:
            hr = c.op("MatMul", [h, rt], f"hr{d}")
            if rb:
                hr = c.op("Add", [hr, rb], f"hrb{d}")
            h_zr, h_h = _split(c, hr, [2 * H, H], f"hr{d}_zr_h")
            zr = c.op("Add", [x_zr, h_zr], f"zr{d}")
            z_pre, r_pre = _split(c, zr, [H, H], f"zr{d}_")
            z, r = _sigmoid_chain(c, z_pre, dt, f"z{d}"), _sigmoid_chain(c, r_pre, dt, f"r{d}")
            pre = c.op("Add", [x_h, c.op("Mul", [r, h_h], f"rh{d}")], f"h{d}_pre")
        else:
            r_zr, r_h = _split(c, rt, [2 * H, H], f"R{d}_zr_h")
            zr = c.op("Add", [x_zr, c.op("MatMul", [h, r_zr], f"hzr{d}")], f"zr{d}")
            rb_zr = rb_h = None
            if rb:
                rb_zr, rb_h = _split(c, rb, [2 * H, H], f"Rb{d}_zr_h", axis=0)
                zr = c.op("Add", [zr, rb_zr], f"zrb{d}")
            z_pre, r_pre = _split(c, zr, [H, H], f"zr{d}_")
            z, r = _sigmoid_chain(c, z_pre, dt, f"z{d}"), _sigmoid_chain(c, r_pre, dt, f"r{d}")
            hh = c.op("MatMul", [c.op("Mul", [r, h], f"rh{d}"), r_h], f"rhR{d}")
            if rb:
                hh = c.op("Add", [hh, rb_h], f"rhRb{d}")
            pre = c.op("Add", [x_h, hh], f"h{d}_pre")
        cand = c.op("Tanh", [pre], f"hcand{d}")
        one_minus_z = c.op("Sub", [c.const(1.0, dt, "one"), z], f"one_minus_z{d}")
        h_new = c.op("Add", [c.op("Mul", [one_minus_z, cand], f"zh{d}"), c.op("Mul", [z, h], f"zprev{d}")], f"h{d}_new")
        new_state = [h_new]
    else:
        h_new = c.op("Tanh", [c.op("Add", [x_t, c.op("MatMul", [h, rt], f"hr{d}")], f"pre{d}")], f"h{d}_new")
        new_state = [h_new]
    cond_out = c.op("Identity", [cond], f"cond{d}_out")
    y = c.op("Identity", [h_new], f"y{d}_t")
    vi = lambda n, elem, shape: helper.make_tensor_value_info(n, elem, shape)  # noqa: E731
    et = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}[dt]
    # Split sizes are outer-scope constants, which shape inference does not read inside a body:
    # declare the gate blocks' ranks (the sites need them).
    blocks = [vi(o, et, [None, None] if _attr(n, "axis", 0) == 1 else [None])
              for n in c.nodes if n.op_type == "Split" for o in n.output]
    body = helper.make_graph(
        c.nodes, ctx.fresh(f"{c.origin_name}_step{d}"),
        [vi(it, TensorProto.INT64, []), vi(cond, TensorProto.BOOL, [])] + [vi(n, et, [None, H]) for n in state_in],
        [vi(cond_out, TensorProto.BOOL, [])] + [vi(n, et, [None, H]) for n in new_state] + [vi(y, et, [None, H])],
        value_info=blocks)
    return body, c.inits
def einsum_as_matmul(equation: str) -> dict | str:
    """The batched matrix product an Einsum equation is, or why it is not one.

    Returns ``{"a": letters, "b": letters, "out": letters, "batch", "rows", "cols", "sums"}``:
    batch letters are in both operands and the output (in output order), rows in the first
    operand and the output, cols in the second and the output, sums in both operands only (rows
    and cols in output order, sums in first-operand order)."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return f"Einsum {equation!r}: implicit output (no '->') is not decomposed"
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return f"Einsum {equation!r}: {len(ops)} operand(s); only two-operand products are decomposed"
    a, b = ops
    if "." in eq:
        return f"Einsum {equation!r}: ellipsis is not decomposed"
    for term in (a, b, out):
        if len(set(term)) != len(term):
            return f"Einsum {equation!r}: a repeated letter in {term!r} (a diagonal or trace) is not a matrix product"
    only_one = [c for c in a + b if c not in out and ((c in a) != (c in b))]
    if only_one:
        return f"Einsum {equation!r}: letter(s) {''.join(only_one)!r} summed within one operand (not a matrix product)"
    extra = [c for c in out if c not in a and c not in b]
    if extra:
        return f"Einsum {equation!r}: output letter(s) {''.join(extra)!r} in no operand"
    return {"a": a, "b": b, "out": out,
            "batch": [c for c in out if c in a and c in b],
            "rows": [c for c in out if c in a and c not in b],
            "cols": [c for c in out if c in b and c not in a],
            "sums": [c for c in a if c in b and c not in out]}


def _einsum(node: onnx.NodeProto, ctx: RewriteContext) -> Replacement:
    """Batched-matmul Einsum -> Transpose/Reshape of each operand to [batch..., M, K] and
    [batch..., K, N], one MatMul, Reshape/Transpose of the result to the output's letter order.
    Only the MatMul is arithmetic (a gemm site whose ``k`` runs over the summed letters flattened
    row-major in first-operand order); the rest moves data."""
    form = einsum_as_matmul(_text(_attr(node, "equation", "")))
    if isinstance(form, str):
        raise SkipNode(form)
    b = ctx.builder(node)
    batch, rows, cols, sums = form["batch"], form["rows"], form["cols"], form["sums"]

    def arrange(x: str, letters: str, order: list, tag: str, groups: list) -> str:
        perm = [letters.index(c) for c in order]
        if perm != list(range(len(perm))):
            x = b.op("Transpose", [x], f"{tag}_T", perm=perm)
        if all(len(g) == 1 for g in groups):
            return x
        # [batch..., group1 dims..., group2 dims...] -> [batch..., prod(group1), prod(group2)]
        shape = b.op("Shape", [x], f"{tag}_shape")
        parts, pos = [], 0
        for g in [[c] for c in batch] + groups:
            idx = b.init(np.arange(pos, pos + len(g), dtype=np.int64), f"{tag}_axes")
            dims = b.op("Gather", [shape, idx], f"{tag}_dims")
            parts.append(dims if len(g) == 1 else b.op("ReduceProd", [dims], f"{tag}_size", keepdims=1))
            pos += len(g)
        return b.op("Reshape", [x, b.op("Concat", parts, f"{tag}_new_shape", axis=0)], f"{tag}_mat")

    lhs = arrange(node.input[0], form["a"], batch + rows + sums, "A", [rows, sums])
    rhs = arrange(node.input[1], form["b"], batch + sums + cols, "B", [sums, cols])
    y = b.op("MatMul", [lhs, rhs], "matmul")
    if not (len(rows) == 1 and len(cols) == 1):  # [batch..., M, N] -> [batch..., rows..., cols...]
        a_shape = b.op("Shape", [node.input[0]], "A_in_shape")
        b_shape = b.op("Shape", [node.input[1]], "B_in_shape")
        a_idx = b.init(np.array([form["a"].index(c) for c in batch + rows], np.int64), "out_axes_a")
        b_idx = b.init(np.array([form["b"].index(c) for c in cols], np.int64), "out_axes_b")
        new_shape = b.op("Concat", [b.op("Gather", [a_shape, a_idx], "out_dims_a"),
                                    b.op("Gather", [b_shape, b_idx], "out_dims_b")], "out_shape", axis=0)
        y = b.op("Reshape", [y, new_shape], "unflat")
    have = batch + rows + cols
    perm = [have.index(c) for c in form["out"]]
    if perm != list(range(len(perm))):
        y = b.op("Transpose", [y], "out_T", perm=perm)
    return b.finish(y)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


HANDLERS: dict[str, Handler] = {
    "Einsum": _einsum,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    "LayerNormalization": _layer_norm,
    "Gelu": _gelu,
    "BatchNormalization": _batch_norm,
    "Sigmoid": _sigmoid,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Gemm": _gemm,
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "RNN": _recurrent,
}


# ----------------------------------------------------------------------------- the pass

def _rewrite_graph(graph: onnx.GraphProto, main: onnx.GraphProto, ctx: RewriteContext, wanted: set,
                   result: PassResult, maybe_dead: set, dropped_outputs: set) -> None:
    """Rewrite the wanted nodes of ``graph``, then of the If/Loop/Scan bodies it holds (nodes that
    ``harden`` inserted are left alone). New initializers go to the main graph, which every
    subgraph can read."""
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in wanted:
            new_nodes.append(node)
            continue
        label = _node_label(node)
        if node.domain not in _DEFAULT_DOMAINS:
            result.skipped.append((label, f"domain {node.domain!r} is not the default ONNX domain"))
            new_nodes.append(node)
            continue
        try:
            rep = HANDLERS[node.op_type](node, ctx)
        except SkipNode as exc:
            result.skipped.append((label, str(exc)))
            new_nodes.append(node)
            continue
        new_nodes.extend(rep.nodes)
        main.initializer.extend(rep.initializers)
        if rep.value_info:  # replaces what shape inference left without a rank
            declared = {v.name for v in rep.value_info}
            kept = [v for v in graph.value_info if v.name not in declared]
            del graph.value_info[:]
            graph.value_info.extend(kept + list(rep.value_info))
        ctx.constants.update((t.name, t) for t in rep.initializers)
        maybe_dead.update(i for i in node.input if i)
        dropped_outputs.update(o for o in node.output[1:] if o)
        line = f"{node.op_type} {label} -> {len(rep.nodes)} nodes"
        if rep.notes:
            line += f" ({'; '.join(rep.notes)})"
        result.inserted.append(line)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for node in graph.node:
        if any(p.key == _ROLE_KEY for p in node.metadata_props):
            continue
        for sub in _subgraphs(node):
            _rewrite_graph(sub, main, ctx, wanted, result, maybe_dead, dropped_outputs)


def decompose(model: onnx.ModelProto, op_types: Iterable[str] | None = None) -> PassResult:
    """Rewrite fused ops of ``model`` (default: all in ``HANDLERS``) into primitive ops.

    Returns a new model; ``model`` is not modified. Raises ``ValueError`` for an
    unknown op type in ``op_types`` or a default-domain opset below 18.
    """
    wanted = set(HANDLERS) if op_types is None else set(op_types)
    unknown = wanted - set(HANDLERS)
    if unknown:
        raise ValueError(f"no decomposition for {sorted(unknown)}; supported: {sorted(HANDLERS)}")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"default-domain opset {opset} < {MIN_OPSET}; upgrade with onnx.version_converter first")

    out = copy.deepcopy(model)
    graph = out.graph
    ctx = RewriteContext(out)
    result = PassResult(model=out)

    maybe_dead: set[str] = set()
    dropped_outputs: set[str] = set()
    _rewrite_graph(graph, graph, ctx, wanted, result, maybe_dead, dropped_outputs)

    # Drop initializers only the rewritten nodes read (e.g. BatchNorm stats, a
    # Gemm operand transposed offline), and value_info of dropped optional outputs.
    if maybe_dead or dropped_outputs:
        still_used = {o.name for o in graph.output} | {i.name for i in graph.input}
        for g in _all_graphs(graph):
            for n in g.node:
                still_used.update(n.input)
        keep = [t for t in graph.initializer if t.name not in maybe_dead or t.name in still_used]
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
        vis = [v for v in graph.value_info if v.name not in dropped_outputs]
        if len(vis) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(vis)
    return result
