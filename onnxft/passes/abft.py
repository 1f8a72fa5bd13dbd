"""ABFT passes: checksum protection of MatMul and Gemm as a standard-ONNX graph rewrite.

For every protected GEMM unit (a MatMul, optionally with the bias Add that follows it, or a Gemm)
the pass inserts, in the main graph, a row-checksum test and one ``If``:

    r = ReduceSum(Y, -1);  ref = A @ (B e) (+ sum bias);  scale = tau * |A| @ (|B| e) (+ tau sum|bias|) + eta
    flagged = NOT(|r - ref| <= scale)         (NaN and Inf are flagged)

(``eta``: the absolute term for results that underflow, ``thresholds.underflow_term``, in every
test the pass builds: row, block, column, Conv, and at run-time sizes.)
    Y' = If(any(flagged), then=recovery, else=Identity(Y))

so the fault-free output is bit-identical to the original. ``B e`` and ``tau |B| e`` are
initializers for constant weights (computed in float64 offline) and ReduceSum / ReduceL1 at run
time for activation x activation products (QK^T, attention x V).

Recovery (the ``then`` branch) works per GEMM unit = one matrix of the batch (every leading index
of ``A [..., M, K]`` is its own GEMM; a rank-2 ``A [M, K]`` is M GEMMs of one row), so results
never depend on how a batch is composed:

- ``standard``: column checksums too; a matrix with exactly one flagged row and one flagged
  column gets that element recomputed (its dot product, plus bias); any other flagged pattern
  recomputes the matrix.
- ``sec``: standard ABFT with single-error correction only, as the ABFT works the seed paper
  compares against ([40], [52]-[57]): the one-row-one-column pattern is corrected, and any other
  flagged pattern is left as it is (detected, counted, not recovered). A baseline for comparisons,
  not a scheme to ship.
- ``lb`` (LB-ABFT, seed paper Fig. 6): block-wise tests on ``b x b`` output blocks; only the
  flagged blocks are recomputed (gather rows of A and columns of B, MatMul, ScatterND). ``b`` per
  GEMM from ``opt_block_size`` (Algorithm 2) or given; a GEMM with dynamic dimensions gets it at
  representative shapes (``shapes``). The block grid is built from the run-time M and N (padding
  to a multiple of b), so dynamic batch, token and sequence axes keep LB; a dynamic inner
  dimension K (attention x V) gets its threshold computed in the graph from the run-time K.

float16 products are checked in float32 with the float16 rounding bound. MatMul/Gemm/Conv inside
If/Loop/Scan bodies are listed as skipped.

The pass is pure: it returns a new model and never runs a session. Thresholds come from the
rounding bound (no false alarm possible) or from ``calibrate_abft`` data (which tightens tau,
never eta). docs/abft.md has the
details.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from ..graph.checksums import (Nodes, any_false, block_indicator, checksum_test, count_true, duplicate_test,
                               fused_row_test, mark_recompute, reduce, unsqueeze, weight_checksum_vectors,
                               weight_row_test, activation_row_test)
from ..graph.edit import default_opset, insert_after, producer_index, walk
from ..graph.roles import PROTECTION, RECOVERY_KEY, role_of, set_meta
from ..runtime.model_io import external_data_dir
from .abft_conv import folds_at_load, find_convs, protect_conv
from .thresholds import (DEFAULT_PRECISION, Precision, calibrated_tau, count_coefficients, precision as get_precision,
                         tau_bound, underflow_coefficients, underflow_term, unit_precision)
from .blocksize import lb_cost, opt_block_size, standard_cost
from .decompose import constant_value
from .result import PassResult

SCHEMES = ("lb", "standard", "sec")
# How the main graph detects a fault (docs/abft.md, "Implementations"); every one keeps LB-ABFT's
# block test and recovery in the If. "ig" (per GEMM, by arithmetic intensity) is resolved to one of
# these by campaigns.abft_impl before the pass runs.
IMPLS = ("global", "fused", "dup")
MIN_OPSET = 13
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
CAL_MARGIN = 4.0
CAL_FLOOR_ULPS = 16.0  # calibrated tau never goes below 16 unit roundoffs
FLAG_PREFIX = "onnxft.abft."
SCATTER_TAIL = True  # the If returns a scatter applied in place (False: the If returns the checked Y)


class AbftError(ValueError):
    """A user-facing problem with the model or the options."""


@dataclass
class GemmSite:
    """One protectable (or skipped) GEMM unit of the main graph."""

    name: str  # the MatMul/Gemm node name (or its output when unnamed)
    op_type: str
    a: str
    b: str
    y: str  # the GEMM node's output
    out: str  # the protected output (the bias Add's output for MatMul+Add units)
    bias_node: str | None = None  # name of the fused bias Add
    post_node: str | None = None  # a scalar Mul/Div right after the product (attention's 1/sqrt(d))
    post_scale: float | None = None  # its factor (1/c for a Div by c)
    b_constant: bool = False
    qdq: bool = False
    M: int | None = None
    N: int | None = None
    K: int | None = None
    batch_dims: list = field(default_factory=list)  # leading dims of Y (ints or names)
    a_rank: int | None = None
    b_rank: int | None = None
    rowwise: bool = False  # rank-2 A: every row is a GEMM of M=1
    fp16: bool = False  # a float16 product: checked in float32 (inputs and output cast), float16 bound
    skip: str | None = None  # why it is not protectable (None = protectable)

    @property
    def extra_roundings(self) -> int:
        """Roundings the unit adds after the dot products: the post-scale itself and B's scaling."""
        return 2 if self.post_scale is not None else 0

    @property
    def unit_rows(self) -> int | None:
        return 1 if self.rowwise else self.M


def _dims(vi_map, name):
    t = vi_map.get(name)
    if t is None or not t.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.type.tensor_type.shape.dim]


def _elem(vi_map, name):
    t = vi_map.get(name)
    return None if t is None else t.type.tensor_type.elem_type


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def required_opset(model: onnx.ModelProto) -> int:
    v = default_opset(model)
    if v is None:
        raise AbftError("the model imports no default ONNX opset")
    return v


def _with_reshape_ranks(inferred: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference again after giving each Reshape whose output rank was lost the rank it must
    have: the length of its shape input (static even when the values are computed at run time, as
    in tf2onnx's Flatten: Shape -> Cast -> Slice -> Concat -> Cast -> Reshape). The sizes stay
    unknown; what follows the Reshape (MatMul, Add, ...) gets its rank from there."""
    g = inferred.graph
    vi = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
    inits = {t.name: t for t in g.initializer}

    def shape_of(name):
        if name in inits:
            return list(inits[name].dims)
        v = vi.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    added = []
    for n in g.node:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        out = n.output[0]
        known = shape_of(out)
        target = shape_of(n.input[1])
        elem = vi[n.input[0]].type.tensor_type.elem_type if n.input[0] in vi else 0
        if known is None and target is not None and len(target) == 1 and target[0] and elem:
            added.append(helper.make_tensor_value_info(out, elem, [None] * target[0]))
    if not added:
        return inferred
    named = {v.name for v in added}
    keep = [v for v in g.value_info if v.name not in named]
    del g.value_info[:]
    g.value_info.extend(keep + added)
    return shape_inference.infer_shapes(inferred, data_prop=True)


class _Model:
    """Lookup tables over the main graph (after shape inference on a copy)."""

    def __init__(self, model: onnx.ModelProto):
        try:
            self.inferred = _with_reshape_ranks(shape_inference.infer_shapes(model, data_prop=True))
        except Exception as exc:
            raise AbftError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
        g = self.inferred.graph
        self.vi = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
        self.inits = {t.name: t for t in g.initializer}
        for t in g.initializer:
            self.vi.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        self.producers = {o: n for n in g.node for o in n.output}
        self.consumers: dict = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.ext = external_data_dir(model)

    def const(self, name: str):
        """Value of a constant tensor, looking through DequantizeLinear of a constant."""
        v = constant_value(name, self.inits, self.producers, self.ext)
        if v is not None:
            return v
        n = self.producers.get(name)
        if n is not None and n.op_type == "Transpose" and n.domain in ("", "ai.onnx"):
            # a weight stored in another layout (tf2onnx's HWIO -> OIHW when not folded)
            w = self.const(n.input[0])
            return None if w is None else np.transpose(w, _attr(n, "perm", None))
        if n is None or n.op_type != "DequantizeLinear":
            return None
        q = constant_value(n.input[0], self.inits, self.producers, self.ext)
        s = constant_value(n.input[1], self.inits, self.producers, self.ext)
        z = constant_value(n.input[2], self.inits, self.producers, self.ext) if len(n.input) > 2 and n.input[2] else None
        if q is None or s is None or (len(n.input) > 2 and n.input[2] and z is None):
            return None
        if _attr(n, "block_size", 0):
            return None
        axis = _attr(n, "axis", 1)
        shape = [1] * q.ndim
        if np.size(s) > 1:
            shape[axis % q.ndim] = -1
        zf = 0.0 if z is None else z.astype(np.float32).reshape(shape)
        return ((q.astype(np.float32) - zf) * s.astype(np.float32).reshape(shape)).astype(np.float32)

    def is_dq(self, name: str) -> bool:
        n = self.producers.get(name)
        return n is not None and n.op_type == "DequantizeLinear"


def find_gemms(model: onnx.ModelProto) -> list[GemmSite]:
    """Every MatMul/Gemm of the main graph, protectable or with the reason it is skipped."""
    m = _Model(model)
    sites = []
    for node in m.inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        sites.append(_describe(m, node))
    return sites


def _describe(m: _Model, node) -> GemmSite:
    a, b, y = node.input[0], node.input[1], node.output[0]
    s = GemmSite(name=node.name or y, op_type=node.op_type, a=a, b=b, y=y, out=y)
    da, db, dy = _dims(m.vi, a), _dims(m.vi, b), _dims(m.vi, y)
    if _elem(m.vi, y) not in _FLOATS:
        s.skip = f"output type {_elem(m.vi, y)} is not float32 or float16 (nor QDQ-int8)"
        return s
    s.fp16 = _elem(m.vi, y) == TensorProto.FLOAT16
    if da is None or db is None or dy is None:
        s.skip = RANKS_UNKNOWN
        return s
    s.a_rank, s.b_rank = len(da), len(db)
    if s.a_rank < 2 or s.b_rank < 2:
        s.skip = "vector operand (rank-1 A or B) is not a matrix product"
        return s
    bval = m.const(b)
    s.qdq = m.is_dq(a) and m.is_dq(b)
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            s.skip = "Gemm with transA=1 is not protected yet"
            return s
        if bval is None:
            s.skip = "Gemm with a non-constant B is not protected yet"
            return s
        if len(node.input) > 2 and node.input[2]:
            c = m.const(node.input[2])
            if c is None or (c.ndim >= 1 and int(np.prod(c.shape[:-1])) != 1):
                s.skip = "Gemm bias C is not a constant broadcast over rows"
                return s
    s.b_constant = bval is not None and s.b_rank == 2
    def static(v):
        return v if isinstance(v, int) and v > 0 else None

    # K and N from the weight's shape when shape inference lost them on the activation (window
    # reshapes in Swin, dynamic sequence lengths): a constant B fixes both.
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    s.K = static(da[-1]) or static(db[-1] if trans_b else db[-2])
    s.N = static(dy[-1]) or static(db[-2] if trans_b else db[-1])
    s.M = static(dy[-2])
    if s.K is None and (bval is not None or node.op_type == "Gemm"):
        s.skip = "inner dimension K is not static"
        return s
    if s.a_rank == 2 and s.b_rank == 2:
        s.rowwise = True
        s.batch_dims = [dy[0]]
    else:
        s.batch_dims = dy[:-2]
    if s.b_rank > 2 and s.b_rank != s.a_rank:
        s.skip = "batched operands of different ranks are not protected yet"
        return s
    if node.op_type == "MatMul":
        cons = m.consumers.get(y, [])
        if len(cons) == 1 and y not in m.outputs and cons[0].op_type == "Add":
            add = cons[0]
            other = add.input[1] if add.input[0] == y else add.input[0]
            bias = m.const(other)
            if (bias is not None and s.N is not None and bias.size == s.N and bias.shape[-1] == s.N
                    and _elem(m.vi, add.output[0]) == _elem(m.vi, y) and not _feeds_gelu(m, add.output[0])):
                s.bias_node = add.name or add.output[0]
                s.out = add.output[0]
        if not s.b_constant and s.bias_node is None:
            _absorb_post_scale(m, s)
    return s


def input_lower_bounds(model: onnx.ModelProto) -> dict[str, float | None]:
    """``{gemm name: c}`` for every protectable GEMM with a constant weight: ``A >= -c`` on fault-free
    data (``_lower_bound``), or None where ``A`` is unbounded. (What the fused check's cost depends on:
    with a bound, its scale is one more column of the GEMM and it needs no pass over ``A``.)"""
    m = _Model(model)
    return {s.name: _lower_bound(m, s.a) for s in find_gemms(model) if s.skip is None and s.b_constant}


def _feeds_gelu(m: _Model, tensor: str) -> bool:
    """Whether ``tensor`` (a bias Add's output) starts a GELU: a ``Gelu`` node, or the exported Erf
    form ``Div(x, sqrt 2) -> Erf``. onnxruntime fuses that Add with the GELU (BiasGelu, about 5% of a
    ViT's MLP time); a check reading the Add's output would stop the fusion, so such a MatMul is
    protected alone and the Add stays where the fusion finds it."""
    for c in m.consumers.get(tensor, []):
        if c.op_type in ("Gelu", "BiasGelu"):
            return True
        if c.op_type in ("Div", "Mul") and any(n.op_type == "Erf" for n in m.consumers.get(c.output[0], [])):
            return True
    return False


def _absorb_post_scale(m: _Model, s: GemmSite) -> None:
    """QK^T followed by ``Mul(., c)`` or ``Div(., c)`` with a scalar constant (attention's score
    scaling): the unit's output becomes the scaled scores, so a fault in the scaling is checked too.
    The check and the recovery use ``B * f`` (f = c, or 1/c) in place of B, which equals the
    scaled product up to two more roundings (counted in the threshold)."""
    cons = m.consumers.get(s.out, [])
    if len(cons) != 1 or s.out in m.outputs or cons[0].op_type not in ("Mul", "Div"):
        return
    node = cons[0]
    if node.op_type == "Div" and node.input[0] != s.out:
        return  # c / Y is not a scaling
    other = node.input[1] if node.input[0] == s.out else node.input[0]
    c = m.const(other)
    if c is None or np.size(c) != 1 or _elem(m.vi, node.output[0]) != _elem(m.vi, s.y):
        return
    c = float(np.asarray(c).reshape(()))
    if not np.isfinite(c) or c == 0:
        return
    s.post_node = node.name or node.output[0]
    s.post_scale = c if node.op_type == "Mul" else 1.0 / c
    s.out = node.output[0]


def _bias_vector(m: _Model, s: GemmSite, node) -> np.ndarray | None:
    """The bias as a float32 [N] vector (beta folded for Gemm), or None."""
    if s.op_type == "Gemm":
        if len(node.input) < 3 or not node.input[2]:
            return None
        c = m.const(node.input[2]).astype(np.float64) * float(_attr(node, "beta", 1.0))
        return np.broadcast_to(c.reshape(-1) if c.ndim else c, (s.N,)).astype(np.float32)
    if s.bias_node is None:
        return None
    add = m.consumers[s.y][0]
    other = add.input[1] if add.input[0] == s.y else add.input[0]
    return m.const(other).reshape(-1).astype(np.float32)


def _recovery_bias(main: Nodes, s: GemmSite, node, bias_input: str) -> str:
    """``_bias_vector`` as main-graph nodes on the model's own bias (onnxruntime folds them at load):
    the recovery adds it without a copy in the file. Bit for bit the same float32 values: a float32
    (or float16) C times beta is exact in float64, so rounding it once equals float32's Mul."""
    t = main.op("Reshape", bias_input, main.ints([-1]))
    if s.fp16:
        t = main.op("Cast", t, to=TensorProto.FLOAT)
    if s.op_type == "Gemm":
        beta = float(_attr(node, "beta", 1.0))
        if beta != 1.0:
            t = main.op("Mul", t, main.const(np.float32(beta), hint="beta"))
        t = main.op("Expand", t, main.ints([s.N]))  # (C may be a scalar or [1] broadcast over N)
    return t


def _weight(m: _Model, s: GemmSite, node) -> np.ndarray | None:
    """Constant B as the [K, N] float64 matrix the GEMM multiplies by (transB and alpha folded)."""
    if not s.b_constant:
        return None
    w = m.const(s.b).astype(np.float64)
    if s.op_type == "Gemm":
        if _attr(node, "transB", 0):
            w = w.T
        w = w * float(_attr(node, "alpha", 1.0))
    return w


_NONNEGATIVE_OPS = ("Softmax", "Relu", "Sigmoid", "Exp")


GELU_MIN = 0.17  # min of x Phi(x) is -0.16997 (at x = -0.7518)


def _lower_bound(m: _Model, tensor: str) -> float | None:
    """``c >= 0`` with ``tensor >= -c`` everywhere on fault-free data, or None: 0 for a
    non-negative tensor (``_nonnegative``), ``GELU_MIN`` for a GELU output (a ``Gelu`` node or the
    exported ``x * 0.5 * (1 + Erf(x / sqrt 2))``), ``-lo`` for a range restriction ``Clip(., lo, .)``
    (ABFT's scale then needs no ``Abs`` pass over ``A``: ``weight_row_test``). A fault that
    pushes A below ``-c`` can only make the test stricter for that row (a recompute)."""
    if _nonnegative(m, tensor):
        return 0.0
    node = m.producers.get(tensor)
    if node is None:
        return None
    if node.op_type == "Clip" and role_of(node) == PROTECTION:
        lo = m.const(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "min", None)
        return None if lo is None or not np.isfinite(float(np.asarray(lo))) else max(-float(np.asarray(lo)), 0.0)
    return GELU_MIN if _is_gelu(m, node) else None


def _is_gelu(m: _Model, node, depth: int = 0) -> bool:
    """``node`` computes GELU: a Gelu op, or the Mul/Add/Erf tree of ``x * 0.5 * (1 + Erf(x c))``
    (``c = 1/sqrt 2``, or a Div by ``sqrt 2``) as torch exports it, in any order of the Muls."""
    if node.op_type in ("Gelu", "BiasGelu", "FastGelu"):  # (the tanh form's minimum is -0.1700 too)
        return True
    if node.op_type != "Mul" or depth > 2:
        return False
    erf_inputs, leaves, halves = set(), set(), 0
    stack = [node]
    while stack:
        n = stack.pop()
        for t in n.input:
            c = m.const(t)
            if c is not None:
                halves += int(np.size(c) == 1 and abs(float(np.asarray(c).reshape(())) - 0.5) < 1e-6)
                continue
            p = m.producers.get(t)
            if p is not None and p.op_type == "Mul" and len(stack) < 4:
                stack.append(p)
            elif p is not None and p.op_type == "Add" and any(
                    m.producers.get(i) is not None and m.producers[i].op_type == "Erf" for i in p.input):
                e = next(m.producers[i] for i in p.input if m.producers.get(i) is not None
                         and m.producers[i].op_type == "Erf")
                one = next((m.const(i) for i in p.input if m.const(i) is not None), None)
                if one is None or np.size(one) != 1 or float(np.asarray(one).reshape(())) != 1.0:
                    return False
                d = m.producers.get(e.input[0])
                if d is None or d.op_type not in ("Div", "Mul"):
                    return False
                k = m.const(d.input[1])
                if k is None or np.size(k) != 1:
                    return False
                k = float(np.asarray(k).reshape(()))
                if abs((k if d.op_type == "Mul" else 1.0 / k) - 2**-0.5) > 1e-6:
                    return False
                erf_inputs.add(d.input[0])
            else:
                leaves.add(t)
    return len(erf_inputs) == 1 and leaves == erf_inputs and halves == 1


def _nonnegative(m: _Model, tensor: str, depth: int = 0) -> bool:
    """Whether ``tensor`` can never be negative: a Softmax/Relu/Sigmoid/Exp output, or a range
    restriction (Clip with lower bound >= 0, or Where choosing between such values) of one."""
    node = m.producers.get(tensor)
    if node is None or depth > 6:
        c = m.const(tensor)
        return c is not None and bool(np.all(np.asarray(c) >= 0))
    if node.op_type in _NONNEGATIVE_OPS:
        return True
    if role_of(node) != PROTECTION:
        return False
    if node.op_type == "Clip":
        lo = m.const(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "min", None)
        return (lo is not None and float(np.asarray(lo)) >= 0) or _nonnegative(m, node.input[0], depth + 1)
    if node.op_type == "Where":
        return all(_nonnegative(m, t, depth + 1) for t in node.input[1:])
    return False


REPRESENTATIVE_DIM = 256  # a dynamic dimension nobody gave a representative size for
RANKS_UNKNOWN = "operand ranks unknown after shape inference"


def _fixed_inputs(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """A copy of ``model`` whose dynamic input dimensions are fixed to ``shapes``."""
    fixed = copy.deepcopy(model)
    for vi in fixed.graph.input:
        dims = shapes.get(vi.name)
        if dims is None or not vi.type.tensor_type.HasField("shape"):
            continue
        if len(dims) != len(vi.type.tensor_type.shape.dim):
            raise AbftError(f"representative shape of {vi.name!r} has rank {len(dims)}, the input has rank "
                            f"{len(vi.type.tensor_type.shape.dim)}")
        for d, v in zip(vi.type.tensor_type.shape.dim, dims):
            if not d.HasField("dim_value"):  # (static dimensions stay as the model says)
                d.Clear()
                d.dim_value = int(v)
    del fixed.graph.value_info[:]
    return fixed


def representative_dims(model: onnx.ModelProto, shapes: dict | None) -> dict:
    """``{gemm name: (unit rows, N, K)}`` at representative input shapes: the model's inputs fixed to
    ``shapes`` (``{input name: dims}``, e.g. one calibration batch), shapes inferred again. A dimension
    still unknown (or every dynamic one without ``shapes``) is ``None``."""
    if not shapes:
        return {}
    return {g.name: (g.unit_rows, g.N, g.K) for g in find_gemms(_fixed_inputs(model, shapes)) if g.skip is None}


def _rep(s: GemmSite, rep: dict) -> tuple[tuple[int, int, int], str]:
    """(rows, N, K) for block sizes and the plan: static dims, else representative ones, else
    REPRESENTATIVE_DIM; and where they came from."""
    given = rep.get(s.name, (None, None, None))
    own = (s.unit_rows, s.N, s.K)
    dims = tuple(o if o is not None else g for o, g in zip(own, given))
    if None not in own:
        source = "static"
    elif None not in dims:
        source = "representative shapes"
    else:
        source = f"representative shapes, {REPRESENTATIVE_DIM} for unknown dimensions"
    return tuple(d if d is not None else REPRESENTATIVE_DIM for d in dims), source


def abft(model: onnx.ModelProto, scheme: str = "lb", ber: float = 1e-8, block_size="auto",
         thresholds: dict | None = None, names: str | None = None, gemms=None,
         expose_flags: bool = False, unit_scale: bool = False, precision: str = DEFAULT_PRECISION,
         shapes: dict | None = None, impl="global") -> PassResult:
    """Protect the model's GEMMs with ABFT (see the module docstring).

    ``precision``: the serving runtime's arithmetic (``passes.thresholds.PRECISIONS``: fp32, tf32,
    fp16, fp16acc32, bf16); the rounding bounds hold for it (default tf32: safe on CPU and on CUDA's
    defaults; float16 units as ``thresholds.unit_precision`` says).

    ``block_size``: ``"auto"`` (Algorithm 2 at ``ber``), an int, or ``{gemm name: int}`` (others
    auto). ``thresholds``: ``{gemm name: tau}`` from ``calibrate_abft`` (others use the rounding
    bound). ``names``: regex searched in GEMM names; ``gemms``: explicit list of names.
    ``expose_flags`` adds outputs ``onnxft.abft.<name>.detected`` (bool) and
    ``onnxft.abft.<name>.recomputed`` (int64: output elements recomputed).
    ``unit_scale`` (for calibration): tau = 1 everywhere, so each plan entry's ``scale`` tensor is
    exactly ``|A| @ |B| e`` (+ |bias| sum) and ``residual / scale`` is the residual ratio.
    ``shapes``: representative input shapes ``{input name: dims}`` (e.g. one calibration batch):
    GEMMs with dynamic dimensions get their block size (and the plan its costs) at these shapes;
    the checks themselves work at any run-time shape.
    ``impl``: how the main graph detects a fault (``IMPLS``), one name for every GEMM or
    ``{gemm name: impl}`` (others ``global``): ``global`` (row sums of Y against ``A (B e)``, a
    separate pass), ``fused`` (the checksum columns appended to a constant weight, one GEMM, then
    sliced), ``dup`` (the product again with the weight negated, compared element by element). A
    GEMM an implementation does not fit keeps ``global``; the plan says why (``impl_fallback``).
    """
    if scheme not in SCHEMES:
        raise AbftError(f"unknown ABFT scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if not 0 <= ber < 1:
        raise AbftError(f"BER must be in [0, 1), got {ber}")
    if names is not None:
        try:
            re.compile(names)
        except re.error as exc:
            raise AbftError(f"bad GEMM name pattern {names!r}: {exc}") from None
    try:
        get_precision(precision)
    except ValueError as exc:
        raise AbftError(str(exc)) from None
    opset = required_opset(model)
    if opset < MIN_OPSET:
        raise AbftError(f"the model's default opset is {opset}; ABFT needs opset {MIN_OPSET} or later")
    for v in (impl.values() if isinstance(impl, dict) else [impl]):
        if v not in IMPLS:
            raise AbftError(f"unknown ABFT implementation {v!r}; choose from {', '.join(IMPLS)} (or ig)")
    if not (block_size == "auto" or isinstance(block_size, (int, dict))) or (
            isinstance(block_size, int) and block_size < 1):
        raise AbftError(f"block size must be 'auto', a positive int or a dict, got {block_size!r}")

    m = _Model(model)
    nodes_by_name = {(n.name or n.output[0]): n for n in m.inferred.graph.node}
    sites = find_gemms(model)
    convs = find_convs(m)
    known = {s.name for s in sites} | {c.name for c in convs}
    for name in list(gemms or []) + list((thresholds or {}).keys()) + list(impl if isinstance(impl, dict) else []) + (
            list(block_size.keys()) if isinstance(block_size, dict) else []):
        if name not in known:
            raise AbftError(f"no MatMul/Gemm named {name!r} in the model")
    out = copy.deepcopy(model)
    result = PassResult(model=out)
    result.skipped.extend(_in_subgraphs(model, names, gemms))
    plan = []
    protect = []
    for s in sites:
        if gemms is not None and s.name not in gemms:
            continue
        if names is not None and not re.search(names, s.name):
            continue
        if s.skip:
            result.skipped.append((s.name, s.skip))
            continue
        protect.append(s)
    rep = representative_dims(model, shapes) if any(None in (g.unit_rows, g.N, g.K) for g in protect) else {}
    producers = producer_index(out.graph)
    inserted_after: dict[int, list] = {}
    new_inits = []
    new_infos = []
    new_outputs = []
    dropped: set[str] = set()  # initializers replaced by widened ones (fused)
    for idx, s in enumerate(protect):
        node = nodes_by_name[s.name]
        taus = {s.name: "unit"} if unit_scale else (thresholds or {})
        want = impl.get(s.name, "global") if isinstance(impl, dict) else impl
        entry, built = _protect(m, s, node, idx, scheme, ber, block_size, taus, expose_flags, opset, rep,
                                precision, want)
        plan.append(entry)
        nb_main, raw = built["main"], built["raw"]
        for node_name, position, tensor in built.get("rewire", ()):  # (fused: the widened weight and bias)
            target = next(n for n in out.graph.node if (n.name or n.output[0]) == node_name)
            target.input[position] = tensor
        owner = out.graph.node[producers[s.out]]
        owner.output[list(owner.output).index(s.out)] = built.get("owner_output", raw)
        dropped.update(built.get("drop_inits") or ())
        inserted_after.setdefault(producers[s.out], []).extend(nb_main.nodes)
        new_inits.extend(nb_main.initializers)
        new_infos.extend(nb_main.value_info)
        new_outputs.extend(built["outputs"])
        result.inserted.append(f"{s.name} -> {entry['scheme']} ABFT ({entry['impl']}), {len(nb_main.nodes)} nodes"
                               + (f", block {entry['block_size']}" if entry["block_size"] else ""))
    conv_plan = []
    for idx, c in enumerate(convs):
        if (gemms is not None and c.name not in gemms) or (names is not None and not re.search(names, c.name)):
            continue
        if c.skip:
            result.skipped.append((c.name, c.skip))
            continue
        entry, nb_main, then_nb, raw, fixed, count, cond = protect_conv(c, idx, opset, ber, precision)
        recovery = {"unit": c.name, "op_type": c.op_type, "a": c.x, "b": c.w, "bias": c.b or "", "output": raw}
        outputs = checked_output(nb_main, then_nb, c, raw, f"onnxft.abft.c{idx:03d}", fixed, count,
                                  expose_flags, cond, recovery, dims=_dims(m.vi, c.out),
                                  elem=TensorProto.FLOAT16 if c.fp16 else TensorProto.FLOAT)
        conv_plan.append(entry)
        owner = out.graph.node[producers[c.out]]
        owner.output[list(owner.output).index(c.out)] = raw
        inserted_after.setdefault(producers[c.out], []).extend(nb_main.nodes)
        new_inits.extend(nb_main.initializers)
        new_infos.extend(nb_main.value_info)
        new_outputs.extend(outputs)
        result.inserted.append(f"{c.name} -> Conv ABFT (recompute flagged items), {len(nb_main.nodes)} nodes")
    insert_after(out.graph, inserted_after)
    for i in reversed(range(len(out.graph.initializer))):  # (in place: rebuilding the list copies every weight)
        if out.graph.initializer[i].name in dropped:
            del out.graph.initializer[i]
    out.graph.initializer.extend(new_inits)
    graph_io = {v.name for v in list(out.graph.input) + list(out.graph.output)}
    new_infos = [v for v in new_infos if v.name not in graph_io]  # (graph outputs carry their own shapes)
    annotated = {v.name for v in new_infos}
    kept = [v for v in out.graph.value_info if v.name not in annotated]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept + new_infos)
    out.graph.output.extend(new_outputs)
    result.details = {"scheme": scheme, "ber": ber, "opset": opset, "precision": precision,
                      "impl": impl if isinstance(impl, str) else "per GEMM", "gemms": plan,
                      "convs": conv_plan}
    return result


def _extra_roundings(s: GemmSite, node, has_bias: bool) -> int:
    """Elementwise roundings inside the unit after the products (``passes.thresholds``): the
    post-scale and B's scaling (2), a bias and Gemm's beta (2), Gemm's alpha (1)."""
    gemm_alpha = s.op_type == "Gemm" and _attr(node, "alpha", 1.0) != 1.0
    return s.extra_roundings + (2 if has_bias else 0) + (1 if gemm_alpha else 0)


def _in_subgraphs(model: onnx.ModelProto, names: str | None, gemms) -> list:
    """``(name, reason)`` for every MatMul/Gemm/Conv inside an If, Loop or Scan body: the checks
    are built in the main graph only."""
    out = []
    for node in model.graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for _, n in walk(sub):
                    label = n.name or n.output[0]
                    if n.op_type not in ("MatMul", "Gemm", "Conv") or n.domain not in ("", "ai.onnx"):
                        continue
                    if gemms is not None and label not in gemms:
                        continue
                    if names is not None and not re.search(names, label):
                        continue
                    out.append((label, f"inside the {node.op_type} body of {node.name or node.output[0]!r}: "
                                       f"subgraphs are not protected"))
    return out


def _threshold(s: GemmSite, thresholds: dict, n_sum: int, precision: str, extra: int) -> tuple[float, str]:
    """(tau for the row test, its source). The recovery branch's column and block tests use
    min(their own rounding bound, this tau): a calibrated tau tightens them too."""
    bound = tau_bound(s.K, n_sum, precision, extra, runtime_checksums=not s.b_constant)
    if thresholds.get(s.name) == "unit":
        return 1.0, "unit (calibration)"
    if s.name in thresholds:
        given = thresholds[s.name]
        tau = float(given["tau"] if isinstance(given, dict) else given)
        if not tau > 0:
            raise AbftError(f"threshold for {s.name!r} must be positive, got {tau}")
        if isinstance(given, dict) and "max_ratio" in given:  # calibration data: re-derive for this precision
            tau = calibrated_tau(given["max_ratio"], bound, precision, CAL_MARGIN, CAL_FLOOR_ULPS)
        return min(tau, bound), "calibrated" if tau < bound else "rounding bound"
    return bound, "rounding bound"


def _runtime_tau(nb: Nodes, prec: Precision, extra: int, runtime_checksums: bool, k, n) -> str:
    """``passes.thresholds.tau_bound`` as a graph expression of a run-time ``k`` and/or ``n`` (ints,
    or float32 ``[1]`` tensors such as ``_dim``'s): the rounding counts, affine in K and n
    (``thresholds.count_coefficients``), computed in the graph, then ``(1 + u)(gamma_a + gamma_b) /
    (1 - gamma_c)``. The counts are integers below 2^24, exact in float32; the few float32 roundings
    after them (relative 2^-24 each, Sterbenz's lemma for ``1 - x`` near 1) are covered by a factor
    ``1 + 2^-20``, so the graph's value is never below ``tau_bound``'s. Where a count reaches ``1/u``
    there is no bound, and the result is +inf (nothing is flagged)."""
    gammas = _runtime_gammas(nb, prec, extra, runtime_checksums, k, n)
    inf = nb.const(np.float32([np.inf]), hint="inf")
    # (1 + u)(1 + 2^-20) rounded up to float32
    slack = nb.const(np.float32([1 + 2.0**-20 + 2.0**-23]), hint="onePlusU")
    pick = lambda i: nb.op("Gather", gammas, nb.ints([i]), axis=0)  # noqa: E731
    top = nb.op("Mul", nb.op("Add", pick(0), pick(1)), slack)
    bottom = nb.op("Sub", nb.const(np.float32([1.0]), hint="one"), pick(2))
    return nb.op("Where", nb.op("Greater", bottom, nb.const(np.float32([0.0]), hint="zero")),
                 nb.op("Div", top, bottom), inf)


def _runtime_gammas(nb: Nodes, prec: Precision, extra: int, runtime_checksums: bool, k, n) -> str:
    """``[gamma_a, gamma_b, gamma_c]`` (float32 ``[3]``) of ``tau_bound`` at a run-time ``k``/``n``."""
    const, per_k, per_n = (np.array(v, np.float64) for v in count_coefficients(prec, extra, runtime_checksums))
    static = const + (per_k * k if isinstance(k, int) else 0) + (per_n * n if isinstance(n, int) else 0)
    counts = nb.const(static.astype(np.float32), hint="counts")
    for size, coef in ((k, per_k), (n, per_n)):
        if not isinstance(size, int):
            counts = nb.op("Add", counts, nb.op("Mul", size, nb.const(coef.astype(np.float32), hint="coef")))
    xu = nb.op("Mul", counts, nb.const(np.float32([2.0**-24]), hint="u"))
    left = nb.op("Sub", nb.const(np.float32([1.0]), hint="one"), xu)
    return nb.op("Where", nb.op("Greater", left, nb.const(np.float32([0.0]), hint="zero")),
                 nb.op("Div", xu, left), nb.const(np.float32([np.inf]), hint="inf"))


def _runtime_eta(nb: Nodes, prec: Precision, extra: int, runtime_checksums: bool, k, n) -> str:
    """``passes.thresholds.underflow_term`` as a graph expression of a run-time ``k`` and/or ``n``
    (as ``_runtime_tau``): its bracket, bilinear in K and n (``underflow_coefficients``), times
    ``1 + max gamma`` and a slack ``1 + 2^-19`` that covers the float32 roundings of these few ops
    and of the bracket (so the graph's value is never below ``underflow_term``'s); +inf where no
    finite bound exists."""
    c0, ck, cn, ckn = underflow_coefficients(prec, extra)
    total = nb.const(np.float32([c0 + (ck * k if isinstance(k, int) else 0) + (cn * n if isinstance(n, int) else 0)
                                 + (ckn * k * n if isinstance(k, int) and isinstance(n, int) else 0)]), hint="eta0")
    kn = None  # the K n term when one of them is a tensor
    if not isinstance(k, int):
        total = nb.op("Add", total, nb.op("Mul", k, nb.const(np.float32([ck + (ckn * n if isinstance(n, int) else 0)]),
                                                              hint="etaK")))
    if not isinstance(n, int):
        total = nb.op("Add", total, nb.op("Mul", n, nb.const(np.float32([cn + (ckn * k if isinstance(k, int) else 0)]),
                                                              hint="etaN")))
        if not isinstance(k, int):
            kn = nb.op("Mul", nb.op("Mul", k, n), nb.const(np.float32([ckn]), hint="etaKN"))
    if kn is not None:
        total = nb.op("Add", total, kn)
    gmax = reduce(nb, "ReduceMax", _runtime_gammas(nb, prec, extra, runtime_checksums, k, n), None, keepdims=1)
    factor = nb.op("Mul", nb.op("Add", gmax, nb.const(np.float32([1.0]), hint="one")),
                   nb.const(np.float32([1 + 2.0**-19]), hint="slack"))
    return nb.op("Mul", total, factor)


def _dim(nb: Nodes, tensor: str, axis: int) -> str:
    """``tensor``'s size along ``axis`` as a float32 ``[1]`` (for run-time thresholds)."""
    end = axis + 1 if axis != -1 else 2**62
    return nb.op("Cast", nb.op("Slice", nb.op("Shape", tensor), nb.ints([axis]), nb.ints([end])),
                 to=TensorProto.FLOAT)


def _protect(m: _Model, s: GemmSite, node, idx: int, scheme: str, ber: float, block_size, thresholds: dict,
             expose: bool, opset: int, rep: dict, precision: str = DEFAULT_PRECISION, impl: str = "global"):
    """Build the main-graph test and the If for one unit; return (plan entry, built parts)."""
    prefix = f"onnxft.abft.g{idx:03d}"
    main = Nodes(prefix, opset)
    raw = f"{prefix}/unchecked"
    (rows_r, N_r, K_r), rep_source = _rep(s, rep)
    weight = _weight(m, s, node)
    bias = _bias_vector(m, s, node)
    extra = _extra_roundings(s, node, bias is not None)
    prec = unit_precision(precision, s.fp16)
    # thresholds at the representative shape; dimensions known only at run time get the same
    # rounding bound as a graph expression (below)
    if s.fp16:  # (calibration runs float32 kernels: a float16 unit keeps its rounding bound)
        tau, tau_src = (1.0, "unit (calibration)") if thresholds.get(s.name) == "unit" else (
            tau_bound(K_r, N_r, prec, extra, not s.b_constant), "rounding bound (float16 unit)")
    else:
        tau, tau_src = _threshold(replace(s, K=K_r), thresholds, N_r, prec, extra)
    a_nonnegative = _nonnegative(m, s.a)
    a_lower = _lower_bound(m, s.a)
    y_check = raw
    if s.fp16:
        # float16 products are checked in float32: Y and the operands cast, checksums accumulated in
        # float32; the recovery recomputes in float32 and rounds the result to float16
        y_check = main.op("Cast", raw, to=TensorProto.FLOAT)
        s = replace(s, a=main.op("Cast", s.a, to=TensorProto.FLOAT),
                    b=s.b if weight is not None else main.op("Cast", s.b, to=TensorProto.FLOAT))
    k_rt = None if s.K is not None else _dim(main, s.a, -1)  # run-time K (attention x V, dynamic sequence)

    # --- detection in the main graph ----------------------------------------------------------
    if s.post_scale is not None:  # check and recover with B * f (see _absorb_post_scale)
        s = replace(s, b=main.op("Mul", s.b, main.const(np.float32(s.post_scale), hint="postScale")))
    a = s.a
    tau_name = None
    dynamic = (s.N is None or s.K is None) and tau_src.startswith("rounding bound")
    if dynamic:
        # dynamic N or K (attention over a dynamic sequence): the rounding bound at run time
        n_rt = s.N if s.N is not None else _dim(main, y_check, -1)
        tau_name = _runtime_tau(main, prec, extra, not s.b_constant, s.K if s.K is not None else k_rt, n_rt)
        tau_src = "rounding bound (run time, " + " and ".join(
            d for d, v in (("K", s.K), ("N", s.N)) if v is None) + " dynamic)"
    fold = 1.0 if dynamic else tau  # tau folded into the constants when it is known
    # the absolute underflow term (thresholds.underflow_term) at the representative shape; kept
    # under a calibrated tau, left out only of calibration's probe (whose scale is |A| @ |B| e)
    unit = tau_src.startswith("unit")
    eta = underflow_term(K_r, N_r, prec, extra, not s.b_constant)
    eta_test = None if unit else (
        _runtime_eta(main, prec, extra, not s.b_constant, s.K if s.K is not None else k_rt, n_rt) if dynamic else eta)
    impl, impl_why = _impl_for(m, s, node, impl, scheme, weight, dynamic)
    built_extra: dict = {}
    if impl == "fused":
        ok, diff, scale, raw_z, built_extra = _fused_detection(m, main, s, node, raw, weight, bias, fold, a_lower,
                                                               eta_test)
    elif impl == "dup":
        ok, built_extra = _dup_detection(m, main, s, node, raw), {}
        diff = scale = None
    elif weight is not None:
        w64 = weight.astype(np.float64)
        bs = babs = None
        if bias is not None:
            bs = float(np.sum(bias, dtype=np.float64))
            babs = fold * float(np.sum(np.abs(bias), dtype=np.float64))
        ok, diff, scale = weight_row_test(main, y_check, a, w64.sum(1), fold * np.abs(w64).sum(1),
                                          tau_name if dynamic else None, bs, babs, a_lower, eta_test)
    else:
        if tau_name is None:
            tau_name = main.const(np.float32(tau), hint="tau")
        bs_n = babs_n = None
        if bias is not None:
            bs_n = main.const(np.float32(np.sum(bias, dtype=np.float64)), hint="biasSum")
            babs_n = main.const(np.float32(fold * np.sum(np.abs(bias), dtype=np.float64)), hint="biasAbs")
            if dynamic:
                babs_n = main.op("Mul", babs_n, tau_name)
        if eta_test is not None and not isinstance(eta_test, str):
            eta_test = main.const(np.float32(eta_test), hint="eta")
        ok, diff, scale = activation_row_test(main, y_check, a, s.b, tau_name, s.b_rank == 2, bs_n, babs_n,
                                              a_nonnegative=a_nonnegative, eta=eta_test)
    cond = any_false(main, ok)

    # --- recovery branch -----------------------------------------------------------------------
    eff_scheme = scheme
    b_size = None
    fallback = None
    rows = s.unit_rows
    if eff_scheme == "lb":
        if isinstance(block_size, dict) and s.name in block_size:
            b_size = int(block_size[s.name])
        elif isinstance(block_size, int):
            b_size = int(block_size)
        else:
            b_size = opt_block_size(rows_r, N_r, K_r, ber)[0]
        if rows is not None and s.N is not None:
            b_size = max(1, min(b_size, max(rows, s.N)))
    then_nb = Nodes(f"{prefix}/then", opset, branch=True)
    w_name = None
    bias_name = None
    if bias is not None:
        bias_input = node.input[2] if s.op_type == "Gemm" else _bias_input(m, s)
        # (a bias onnxruntime does not fold at load, a DequantizeLinear output, is stored: the
        # nodes reading it would otherwise run on every inference)
        bias_name = built_extra.get("bias") or (_recovery_bias(main, s, node, bias_input)
                                                if folds_at_load(m, bias_input) else main.const(bias, hint="bias"))
    if weight is not None:
        # the recompute multiplies the model's own weight (never a copy in the file): a Gemm's
        # transB and alpha become main-graph nodes, which onnxruntime constant-folds at load
        # (fused: the first N columns of the widened weight, when it replaced the original)
        w_name = built_extra.get("weight", s.b)
        if s.op_type == "Gemm" and _attr(node, "transB", 0):
            w_name = main.op("Transpose", w_name)
        if s.fp16:  # (the recovery multiplies in float32; onnxruntime folds this at load)
            w_name = main.op("Cast", w_name, to=TensorProto.FLOAT)
        if s.op_type == "Gemm" and _attr(node, "alpha", 1.0) != 1.0:  # (after the Cast: a float32 alpha)
            w_name = main.op("Mul", w_name, main.const(np.float32(_attr(node, "alpha", 1.0)), hint="alpha"))
    # (a float16 unit's branch casts Y itself: were it to read the main graph's Cast, onnxruntime's
    # cast elimination, which renames that Cast's readers to the float32 tensor its CPU kernel
    # computed, could not rename the branch's implicit input and warns once per GEMM at load)
    y_branch = then_nb.op("Cast", raw, to=TensorProto.FLOAT) if s.fp16 else y_check
    ctx = _Canon(then_nb, s, y_branch, ok, w_name, bias_name)

    def branch_tau(n_sum, runtime_checksums: bool):
        """min(the rounding bound of a test summing ``n_sum`` terms, tau): a constant when every
        dimension is static, else computed in the branch from the run-time K and rows."""
        if s.K is not None and isinstance(n_sum, int):
            return min(tau_bound(s.K, n_sum, prec, extra, runtime_checksums), tau)
        bound = _runtime_tau(then_nb, prec, extra, runtime_checksums, s.K if s.K is not None else k_rt, n_sum)
        return bound if tau_src.startswith("rounding bound") else then_nb.op(
            "Min", bound, then_nb.const(np.float32([tau]), hint="tau"))

    def branch_eta(n_sum, runtime_checksums: bool):
        """The absolute underflow term of that test (a calibrated tau never drops it)."""
        if s.K is not None and isinstance(n_sum, int):
            return then_nb.const(np.float32([underflow_term(s.K, n_sum, prec, extra, runtime_checksums)]), hint="eta")
        return _runtime_eta(then_nb, prec, extra, runtime_checksums, s.K if s.K is not None else k_rt, n_sum)

    if eff_scheme in ("standard", "sec"):
        n_rows = rows if rows is not None else _dim(then_nb, ctx.Y3, 1)
        eta_recovery = underflow_term(K_r, rows_r, prec, extra, True)
        fixed, count = _standard_then(ctx, branch_tau(n_rows, True), recompute_multiple=eff_scheme == "standard",
                                      eta=branch_eta(n_rows, True))
    else:
        # the block checksums are summed in the branch from B as it reads it (runtime_checksums), a
        # Gemm's alpha already multiplied in: that rounding of each element is one more term of the
        # sums' error (b_size + 1 counts it in the reference and in the scale)
        scaled_b = weight is not None and s.op_type == "Gemm" and _attr(node, "alpha", 1.0) != 1.0
        eta_recovery = underflow_term(K_r, b_size + scaled_b, prec, extra, True)
        fixed, count = _lb_then(ctx, b_size, branch_tau(b_size + scaled_b, True), bias,
                                elem_ok=ok if impl == "dup" else None, eta=branch_eta(b_size + scaled_b, True))
    if s.fp16:
        fixed = then_nb.op("Cast", fixed, to=TensorProto.FLOAT16)
    # The If returns a scatter (indices, values) rather than the checked tensor: the fault-free
    # branch returns an empty one, and ScatterElements then updates Y's own buffer (Flatten aliases
    # it), so a clean run never copies Y. (An If returning Identity(Y) copies the whole output.)
    # What inject needs to fault the recovery (--inject-protection): the operands the recompute
    # multiplies (B as the branch reads it: folded weight, scaled B, or the model's own B).
    recovery = {"unit": s.name, "op_type": "MatMul", "a": s.a, "b": w_name or s.b, "bias": "", "output": raw}
    outputs = checked_output(main, then_nb, s, raw, prefix, fixed, count, expose, cond, recovery,
                             dims=_dims(m.vi, s.out), elem=TensorProto.FLOAT16 if s.fp16 else TensorProto.FLOAT)

    # --- plan ---------------------------------------------------------------------------------
    # costs at the representative shape when a dimension is dynamic
    costs = lb_cost(rows_r, N_r, K_r, ber, b_size) if eff_scheme == "lb" else standard_cost(
        rows_r, N_r, K_r, ber, recompute_multiple=eff_scheme == "standard")
    entry = {"name": s.name, "op_type": s.op_type, "output": s.out, "M": s.M, "N": s.N, "K": s.K,
             "unit_rows": rows, "batch_dims": list(s.batch_dims), "rowwise": s.rowwise,
             "bias": s.bias_node, "has_bias": bias is not None, "b_constant": s.b_constant, "qdq": s.qdq,
             "scheme": eff_scheme, "fallback": fallback, "block_size": b_size,
             "impl": impl, "impl_fallback": impl_why,
             "shape_for_costs": {"rows": rows_r, "N": N_r, "K": K_r, "source": rep_source},
             "tau": tau, "tau_bound": tau_bound(K_r, N_r, prec, extra, not s.b_constant), "precision": prec.name,
             "eta": None if impl == "dup" else eta, "eta_recovery": eta_recovery,
             "post_scale": s.post_node, "tau_source": tau_src,
             "main_graph_nodes": len(main.nodes),
             "ops_gemm": rows_r * N_r * 2 * K_r,
             "ops_detection": costs.get("detection"),
             "ops_expected_recovery": costs["block_detection"] + costs["recovery"],
             "p_gemm_faulty": costs.get("p_gemm_faulty"),
             "residual": diff, "scale": scale}  # tensor names, for calibrate_abft
    built = {"main": main, "raw": raw, "outputs": outputs, "diff": diff, "scale": scale}
    if impl == "fused":
        built.update(owner_output=raw_z, rewire=built_extra["rewire"], drop_inits=built_extra["drop_inits"])
    return entry, built


def _impl_for(m: _Model, s: GemmSite, node, impl: str, scheme: str, weight, dynamic: bool) -> tuple[str, str | None]:
    """(the implementation this unit gets, why not the one asked for, or None)."""
    if impl == "global":
        return "global", None
    why = None
    if scheme != "lb":
        why = f"{impl} is built on LB-ABFT's block recovery; --abft {scheme} checks with global"
    elif weight is None:
        why = f"{impl} needs a constant weight (activation x activation product)"
    elif s.fp16 or s.qdq or dynamic:
        why = f"{impl} is not built for {'float16' if s.fp16 else 'QDQ' if s.qdq else 'dynamic-threshold'} units"
    elif impl == "fused":
        init = m.inits.get(s.b)
        if init is None or init.data_type != TensorProto.FLOAT:
            why = "fused needs the weight as a float32 initializer"
        elif s.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
            why = "fused is not built for a Gemm with alpha or beta other than 1"
        elif s.bias_node is not None and m.const(_bias_input(m, s)) is None:
            why = "fused needs a constant bias"
        elif s.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and node.input[2] not in m.inits:
            why = "fused needs the Gemm's C as an initializer"
    return ("global", why) if why else (impl, None)


def _bias_input(m: _Model, s: GemmSite) -> str:
    """The bias Add's constant input (a MatMul+Add unit)."""
    add = m.consumers[s.y][0]
    return add.input[1] if add.input[0] == s.y else add.input[0]


def _fused_detection(m: _Model, main: Nodes, s: GemmSite, node, raw: str, weight, bias, fold: float,
                     a_lower: float | None, eta: float | None = None):
    """``fused``: the GEMM itself multiplies ``[B | B e | tau |B| e]`` (the last column only when
    ``A`` is bounded below, ``_lower_bound``: otherwise ``|A|`` needs a pass anyway and the scale
    is ``|A| @ tau|B|e``); the bias (MatMul+Add, a Gemm's C) is widened with its sums. ``raw`` (the
    Y every later node reads, and the check reads) is the first N columns of the widened product.
    ``eta``: the absolute underflow term, added to the scale with the other constant.
    Returns (ok, diff, scale, the widened product's name, rewiring for the main loop)."""
    w64 = weight.astype(np.float64)
    be, abe = weight_checksum_vectors(w64.sum(1), fold * np.abs(w64).sum(1))
    scale_in_z = a_lower is not None
    cols = [be, abe] if scale_in_z else [be]
    trans_b = s.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    orig = onnx.numpy_helper.to_array(m.inits[s.b])
    extra = np.stack(cols, 1)  # [K, 1 or 2], float32
    wide = np.concatenate([orig, extra.T], 0) if trans_b else np.concatenate([orig, extra], 1)
    w_wide = main.const(wide, hint="Bwide")
    rewire = [(s.name, 1, w_wide)]
    out = {"drop_inits": []}
    if _only_use(m, s.b):
        # the widened weight replaces the original in the file; the recovery reads its first N columns
        # (a Slice of an initializer: onnxruntime folds it at load)
        out["drop_inits"].append(s.b)
        axis = 0 if trans_b else 1
        out["weight"] = main.op("Slice", w_wide, main.ints([0]), main.ints([s.N]), main.ints([axis]))
    scale_add = 2.0 * a_lower * float(np.sum(abe, dtype=np.float64)) if a_lower else 0.0
    scale_add += eta or 0.0
    if bias is not None:
        bias_abs = fold * float(np.sum(np.abs(bias), dtype=np.float64))
        if scale_in_z:  # the scale column's bias entry carries the constant terms too: no Add per inference
            widen, scale_add = [float(np.sum(bias, dtype=np.float64)), bias_abs + scale_add], 0.0
        else:
            widen, scale_add = [float(np.sum(bias, dtype=np.float64))], scale_add + bias_abs
        c_wide = np.concatenate([bias.astype(np.float32), np.float32(widen)])
        if s.op_type == "Gemm":
            rewire.append((s.name, 2, main.const(c_wide, hint="Cwide")))
            old_bias = node.input[2]
        else:
            add = m.consumers[s.y][0]
            old_bias = _bias_input(m, s)
            rewire.append((add.name or add.output[0], list(add.input).index(old_bias),
                           main.const(c_wide, hint="biasWide")))
        if old_bias in m.inits and _only_use(m, old_bias):
            out["drop_inits"].append(old_bias)  # (the recovery then reads the widened bias's first N)
            out["bias"] = main.op("Slice", rewire[-1][2], main.ints([0]), main.ints([s.N]), main.ints([0]))
    z = main.name("wide")
    y = main.op("Slice", z, main.ints([0]), main.ints([s.N]), main.ints([-1]), outputs=[raw])
    ok, diff, scale = fused_row_test(main, y, z, s.N, scale_in_z, s.a, abe, scale_add or None)
    out["rewire"] = rewire
    return ok, diff, scale, z, out


def _only_use(m: _Model, tensor: str) -> bool:
    """Whether ``tensor`` is read by one node only (subgraphs included) and is no graph input or output."""
    uses = sum(1 for _, n in walk(m.inferred.graph) for i in n.input if i == tensor)
    return uses == 1 and tensor not in m.outputs and tensor not in {i.name for i in m.inferred.graph.input}


def _dup_detection(m: _Model, main: Nodes, s: GemmSite, node, raw: str) -> str:
    """``dup``: the unit computed a second time with the weight (and bias) negated, compared with Y
    element by element (``duplicate_test``). The negated constants are main-graph nodes that
    onnxruntime folds at load into initializers of their own, so its common-subexpression
    elimination cannot merge the two products (it would if both read the same weight), and the file
    holds no copy. Returns the bool ``ok [..., M, N]``."""
    neg_b = main.op("Neg", s.b)
    if s.op_type == "Gemm":
        ins = [s.a, neg_b] + ([main.op("Neg", node.input[2])] if len(node.input) > 2 and node.input[2] else [])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        y2 = main.op("Gemm", *ins, **attrs)
    else:
        y2 = main.op("MatMul", s.a, neg_b)
        if s.bias_node is not None:
            y2 = main.op("Add", y2, main.op("Neg", _bias_input(m, s)))
    return duplicate_test(main, raw, y2)


class _Canon:
    """Canonical views inside the then branch: ``A3 [G, Mc, K]``, ``Y3 [G, Mc, N]``, row flags
    ``[G, Mc]`` and ``B`` either shared ``[K, N]`` (``B3 is None``) or batched ``B3 [G, K, N]``."""

    def __init__(self, nb: Nodes, s: GemmSite, raw: str, ok: str, w_name: str | None, bias: str | None):
        self.nb, self.s, self.bias = nb, s, bias
        shape_y = nb.op("Shape", raw)
        if s.rowwise:
            self.A3 = unsqueeze(nb, s.a, [1])
            self.Y3 = unsqueeze(nb, raw, [1])
            self.rowbad = nb.op("Reshape", nb.op("Not", ok), nb.ints([-1, 1]))  # [G = M, 1]
        else:
            batch = nb.op("Slice", shape_y, nb.ints([0]), nb.ints([-2]))
            mk = nb.op("Slice", nb.op("Shape", s.a), nb.ints([-2]), nb.ints([2**62]))
            a_full = nb.op("Expand", s.a, nb.op("Concat", batch, mk, axis=0))
            self.A3 = nb.op("Reshape", a_full, nb.op("Concat", nb.ints([-1]), mk, axis=0))
            mn = nb.op("Slice", shape_y, nb.ints([-2]), nb.ints([2**62]))
            self.Y3 = nb.op("Reshape", raw, nb.op("Concat", nb.ints([-1]), mn, axis=0))
            m_only = nb.op("Slice", shape_y, nb.ints([-2]), nb.ints([-1]))
            self.rowbad = nb.op("Reshape", nb.op("Not", ok), nb.op("Concat", nb.ints([-1]), m_only, axis=0))
        if w_name is not None:
            self.B, self.B3 = w_name, None
        elif s.b_rank == 2:
            self.B, self.B3 = s.b, None
        else:
            batch = nb.op("Slice", shape_y, nb.ints([0]), nb.ints([-2]))
            kn = nb.op("Slice", nb.op("Shape", s.b), nb.ints([-2]), nb.ints([2**62]))
            b_full = nb.op("Expand", s.b, nb.op("Concat", batch, kn, axis=0))
            self.B, self.B3 = None, nb.op("Reshape", b_full, nb.op("Concat", nb.ints([-1]), kn, axis=0))

    def b_for(self, g: str | None) -> str:
        """B for the matrices ``g`` (gathered when batched)."""
        return self.B if self.B3 is None else self.nb.op("Gather", self.B3, g, axis=0)

    def b_rows_t(self, g: str | None, cols: str) -> str:
        """Columns ``cols [F, c]`` of B for matrices ``g [F]`` as rows: ``[F, c, K]``."""
        nb = self.nb
        if self.B3 is None:
            return nb.op("Gather", nb.op("Transpose", self.B), cols, axis=0)
        bt = nb.op("Gather", nb.op("Transpose", self.B3, perm=[0, 2, 1]), g, axis=0)  # [F, N, K]
        return nb.op("GatherND", bt, unsqueeze(nb, cols, [-1]), batch_dims=1)

    def a_rows(self, g: str, rows: str) -> str:
        """Rows ``rows [F, r]`` of A for matrices ``g [F]``: ``[F, r, K]``."""
        nb = self.nb
        ag = nb.op("Gather", self.A3, g, axis=0)
        return nb.op("GatherND", ag, unsqueeze(nb, rows, [-1]), batch_dims=1)


def _flat_nonzero(nb: Nodes, flags: str) -> str:
    """Indices of True in a 1-D bool tensor, as ``[F]`` int64."""
    return nb.op("Reshape", nb.op("NonZero", flags), nb.ints([-1]))


def _standard_then(c: _Canon, tau_col: float, recompute_multiple: bool = True, eta: str | None = None):
    """Column test, then: one flagged row and one flagged column -> that element recomputed; any
    other flagged pattern -> the matrix recomputed (``recompute_multiple``) or left as it is.
    ``eta``: the column test's absolute underflow term (a tensor name)."""
    nb = c.nb
    f32 = lambda v: nb.const(np.float32(v))  # noqa: E731
    # column test per matrix: sum over rows of Y vs (e^T A) @ B
    y_cols = reduce(nb, "ReduceSum", c.Y3, [1])  # [G, 1, N]
    a_sum = reduce(nb, "ReduceSum", c.A3, [1])  # [G, 1, K]
    a_l1 = reduce(nb, "ReduceL1", c.A3, [1])
    bmat = c.B if c.B3 is None else c.B3
    ref = nb.op("MatMul", a_sum, bmat)
    tau_c = tau_col if isinstance(tau_col, str) else f32(tau_col)  # (a run-time bound when K or M is dynamic)
    scale = nb.op("Mul", nb.op("MatMul", a_l1, nb.op("Abs", bmat)), tau_c)
    if c.bias is not None:
        rows_f = nb.op("Cast", nb.op("Slice", nb.op("Shape", c.Y3), nb.ints([1]), nb.ints([2])), to=TensorProto.FLOAT)
        ref = nb.op("Add", ref, nb.op("Mul", c.bias, rows_f))
        scale = nb.op("Add", scale, nb.op("Mul", nb.op("Abs", c.bias), nb.op("Mul", rows_f, tau_c)))
    if eta is not None:
        scale = nb.op("Add", scale, eta)
    okc = nb.op("LessOrEqual", nb.op("Abs", nb.op("Sub", y_cols, ref)), scale)
    n_only = nb.op("Slice", nb.op("Shape", c.Y3), nb.ints([2]), nb.ints([3]))
    colbad = nb.op("Reshape", nb.op("Not", okc), nb.op("Concat", nb.ints([-1]), n_only, axis=0))  # [G, N]
    n_rows = count_true(nb, c.rowbad, [1])
    n_cols = count_true(nb, colbad, [1])
    one = nb.ints(1)
    single = nb.op("And", nb.op("Equal", n_rows, one), nb.op("Equal", n_cols, one))
    anybad = nb.op("Greater", nb.op("Add", n_rows, n_cols), nb.ints(0))
    whole = nb.op("And", anybad, nb.op("Not", single))
    y = c.Y3
    # one faulty element: recompute its dot product (recompute, not subtract: subtracting a huge
    # flipped value from the checksum difference leaves rounding garbage)
    gs = _flat_nonzero(nb, single)
    i_all = nb.op("ArgMax", nb.op("Cast", c.rowbad, to=TensorProto.FLOAT), axis=1, keepdims=0)
    j_all = nb.op("ArgMax", nb.op("Cast", colbad, to=TensorProto.FLOAT), axis=1, keepdims=0)
    ig, jg = nb.op("Gather", i_all, gs, axis=0), nb.op("Gather", j_all, gs, axis=0)
    arow = nb.op("Squeeze", c.a_rows(gs, unsqueeze(nb, ig, [1])), nb.ints([1]))
    bcol = nb.op("Squeeze", c.b_rows_t(gs, unsqueeze(nb, jg, [1])), nb.ints([1]))
    dot = reduce(nb, "ReduceSum", nb.op("Mul", arow, bcol), [1], keepdims=0)
    val = dot
    if c.bias is not None:
        val = nb.op("Add", val, nb.op("Gather", c.bias, jg, axis=0))
    idx = nb.op("Concat", unsqueeze(nb, gs, [1]), unsqueeze(nb, ig, [1]), unsqueeze(nb, jg, [1]), axis=1)
    mark_recompute(nb, dot, idx, c.Y3)
    y = nb.op("ScatterND", y, idx, val)
    if not recompute_multiple:  # single-error correction only: other patterns stay as they are
        return y, nb.op("Size", gs)
    # any other pattern: recompute the whole matrix
    gw = _flat_nonzero(nb, whole)
    yw = nb.op("MatMul", nb.op("Gather", c.A3, gw, axis=0), c.b_for(gw))
    idx_w = unsqueeze(nb, gw, [1])
    mark_recompute(nb, yw, idx_w, c.Y3)
    if c.bias is not None:
        yw = nb.op("Add", yw, c.bias)
    y = nb.op("ScatterND", y, idx_w, yw)
    per_matrix = nb.op("Div", nb.op("Size", c.Y3), nb.op("Gather", nb.op("Shape", c.Y3), nb.ints(0), axis=0))
    count = nb.op("Add", nb.op("Size", gs), nb.op("Mul", nb.op("Size", gw), per_matrix))
    return y, count


def _pad_last(nb: Nodes, x: str, rank: int, b: int, n: int | None) -> str:
    """``x`` zero-padded along its last axis to a multiple of ``b`` (static or run-time length)."""
    if n is not None:
        pad = (-n) % b
        return x if pad == 0 else nb.op("Pad", x, nb.ints([0] * (2 * rank - 1) + [pad]))
    length = nb.op("Slice", nb.op("Shape", x), nb.ints([-1]), nb.ints([2**62]))
    pad = nb.op("Mod", nb.op("Sub", nb.ints([b]), nb.op("Mod", length, nb.ints([b]))), nb.ints([b]))
    return nb.op("Pad", x, nb.op("Concat", nb.ints([0] * (2 * rank - 1)), pad, axis=0))


def _lb_then(c: _Canon, b: int, tau_blk, bias, elem_ok: str | None = None, eta: str | None = None):
    """Block-wise test and recovery on ``b x b`` output blocks. Works at any run-time shape: block
    sums by padding to a multiple of ``b`` and reshaping, block flags aggregated over row blocks the
    same way, edge indices clamped to the run-time sizes. B's column-block sums ``B E``, ``|B| E``
    are computed here from B as the recompute reads it (a constant weight by its main-graph name),
    never stored: a ``[K, N/b]`` pair per GEMM would be 2/b of the weight in the file, and the branch
    runs only after a detection. ``tau_blk`` is therefore the bound with run-time checksums.
    ``elem_ok`` (dup: the main graph's element-wise comparison, Y's shape): the blocks holding a
    mismatch are recomputed, with no threshold, so every change the comparison saw is recovered.
    ``eta``: the block test's absolute underflow term (a tensor name)."""
    nb, s = c.nb, c.s
    N = s.N

    def block_reduce(x, rank, n, op_type="ReduceSum"):
        # (pad + reshape + reduce, not x @ E: a NaN or Inf times 0 would spread to every block)
        shape = [0] * (rank - 1) + [-1, b]
        return reduce(nb, op_type, nb.op("Reshape", _pad_last(nb, x, rank, b, n), nb.ints(shape)), [-1], keepdims=0)

    if elem_ok is not None:
        bad_elem = nb.op("Where", nb.op("Reshape", elem_ok, nb.op("Shape", c.Y3)), nb.const(np.float32(0)),
                         nb.const(np.float32(1)))
        return _lb_recompute(c, b, block_reduce(bad_elem, 3, N, "ReduceMax"), block_reduce)
    y_blk = block_reduce(c.Y3, 3, N)  # [G, rows, nbc]
    bmat, rank = (c.B, 2) if c.B3 is None else (c.B3, 3)
    be_n = block_reduce(bmat, rank, N)  # [..., K, nbc]
    abe_n = block_reduce(nb.op("Abs", bmat), rank, N)
    tau_n = tau_blk if isinstance(tau_blk, str) else nb.const(np.float32(tau_blk))
    bs_n = babs_n = None
    if bias is not None:  # (a bias fixes N; its block sums are vectors [1, nbc], offline in float64)
        ind = block_indicator(N, b)
        b64 = bias.astype(np.float64).reshape(1, -1)
        bs_n = nb.const((b64 @ ind).astype(np.float32))
        babs_n = nb.op("Mul", nb.const((np.abs(b64) @ ind).astype(np.float32)), tau_n)
    ok, _, _ = checksum_test(nb, y_blk, c.A3, be_n, abe_n, tau_n, bs_n, babs_n, eta)
    bad = nb.op("Where", ok, nb.const(np.float32(0)), nb.const(np.float32(1)))  # [G, rows, nbc]
    return _lb_recompute(c, b, bad, block_reduce)


def _lb_recompute(c: _Canon, b: int, bad: str, block_reduce):
    """Recompute the ``b x b`` blocks flagged in ``bad [G, rows, nbc]`` (1.0 where a row of a column
    block failed): returns (the fixed ``Y3``, the number of recomputed elements)."""
    nb, s = c.nb, c.s
    rows, N = s.unit_rows, s.N
    # aggregate over row blocks: [G, nbc, rows] -> [G, nbc, nbr] -> [G, nbr, nbc]
    per_col = block_reduce(nb.op("Transpose", bad, perm=[0, 2, 1]), 3, rows, "ReduceMax")
    blocks = nb.op("Greater", nb.op("Transpose", per_col, perm=[0, 2, 1]), nb.const(np.float32(0)))
    idx = nb.op("Transpose", nb.op("NonZero", blocks))  # [F, 3]
    g = nb.op("Gather", idx, nb.ints(0), axis=1)
    bi = nb.op("Gather", idx, nb.ints(1), axis=1)
    bj = nb.op("Gather", idx, nb.ints(2), axis=1)
    ar = nb.ints(np.arange(b))
    bb = nb.ints(b)
    shape_y = nb.op("Shape", c.Y3)
    last_row = nb.ints(rows - 1) if rows is not None else nb.op(
        "Sub", nb.op("Gather", shape_y, nb.ints(1), axis=0), nb.ints(1))
    last_col = nb.ints(N - 1) if N is not None else nb.op(
        "Sub", nb.op("Gather", shape_y, nb.ints(2), axis=0), nb.ints(1))
    # clamp edge blocks into range; the duplicate indices this makes write identical values
    r_idx = nb.op("Min", nb.op("Add", nb.op("Mul", unsqueeze(nb, bi, [1]), bb), ar), last_row)  # [F, b]
    c_idx = nb.op("Min", nb.op("Add", nb.op("Mul", unsqueeze(nb, bj, [1]), bb), ar), last_col)
    a_rows = c.a_rows(g, r_idx)  # [F, b, K]
    b_cols = c.b_rows_t(g, c_idx)  # [F, b, K]
    y_dot = nb.op("MatMul", a_rows, nb.op("Transpose", b_cols, perm=[0, 2, 1]))  # [F, b, b]
    y_new = y_dot
    if c.bias is not None:
        y_new = nb.op("Add", y_new, unsqueeze(nb, nb.op("Gather", c.bias, c_idx, axis=0), [1]))
    f = nb.op("Shape", g)
    shape4 = nb.op("Concat", f, nb.ints([b, b, 1]), axis=0)
    gi = nb.op("Expand", unsqueeze(nb, g, [1, 2, 3]), shape4)
    ri = nb.op("Expand", unsqueeze(nb, r_idx, [2, 3]), shape4)
    ci = nb.op("Expand", unsqueeze(nb, c_idx, [1, 3]), shape4)
    idx_b = nb.op("Concat", gi, ri, ci, axis=3)
    mark_recompute(nb, y_dot, idx_b, c.Y3)
    y = nb.op("ScatterND", c.Y3, idx_b, y_new)
    count = nb.op("Mul", nb.op("Size", g), nb.ints(b * b))
    return y, count


def checked_output(main: Nodes, then_nb: Nodes, s: GemmSite, raw: str, prefix: str, fixed: str, count: str,
                    expose: bool, cond: str, recovery: dict | None = None, dims: list | None = None,
                    elem: int = TensorProto.FLOAT) -> list:
    """The If and what writes the protected output ``s.out``; returns the extra graph outputs.
    ``recovery`` (the recompute's operands) is recorded on the If as metadata for ``inject``
    (None: a recovery ``inject`` does not fault, such as DMR's). ``dims``: the output's dimensions
    (ints, names, or None where unnamed) when its rank is known, for the in-place tail
    (``_scatter_tail``)."""
    opset = main.opset
    else_nb = Nodes(f"{prefix}/else", opset, branch=True)
    if SCATTER_TAIL and dims:
        return _scatter_tail(main, then_nb, else_nb, s, raw, prefix, fixed, count, expose, cond, recovery, dims,
                             elem)
    if not SCATTER_TAIL:
        then_out = then_nb.op("Reshape", fixed, then_nb.op("Shape", raw))
        else_out = else_nb.op("Identity", raw)
        then_outs = [helper.make_tensor_value_info(then_out, elem, None)]
        else_outs = [helper.make_tensor_value_info(else_out, elem, None)]
        if_outputs = [s.out]
        return _if_with_flags(main, then_nb, else_nb, s, prefix, then_outs, else_outs, if_outputs, count, expose, cond,
                              recovery)
    n_flat = then_nb.op("Size", raw)
    then_idx = then_nb.op("Unsqueeze", then_nb.op("Range", then_nb.const(np.int64(0), hint="zero"), n_flat,
                                                  then_nb.const(np.int64(1), hint="one")), then_nb.ints([0]))
    then_vals = then_nb.op("Reshape", fixed, then_nb.ints([1, -1]))
    else_idx = else_nb.op("Identity", else_nb.const(np.zeros((1, 0), np.int64), hint="noIndex"))
    np_elem = helper.tensor_dtype_to_np_dtype(elem)
    else_vals = else_nb.op("Identity", else_nb.const(np.zeros((1, 0), np_elem), hint="noValue"))
    then_outs = [helper.make_tensor_value_info(then_idx, TensorProto.INT64, [1, None]),
                 helper.make_tensor_value_info(then_vals, elem, [1, None])]
    else_outs = [helper.make_tensor_value_info(else_idx, TensorProto.INT64, [1, None]),
                 helper.make_tensor_value_info(else_vals, elem, [1, None])]
    fix_idx, fix_vals = f"{prefix}/fix_index", f"{prefix}/fix_values"
    outputs = _if_with_flags(main, then_nb, else_nb, s, prefix, then_outs, else_outs, [fix_idx, fix_vals], count,
                             expose, cond, recovery)
    flat = main.op("Flatten", raw, axis=0)
    fixed_flat = main.op("ScatterElements", flat, fix_idx, fix_vals, axis=1)
    main.op("Reshape", fixed_flat, main.op("Shape", raw), outputs=[s.out])
    return outputs


def _scatter_tail(main: Nodes, then_nb: Nodes, else_nb: Nodes, s, raw: str, prefix: str, fixed: str,
                  count: str, expose: bool, cond: str, recovery: dict | None, dims: list,
                  elem: int = TensorProto.FLOAT) -> list:
    """``out = ScatterElements(Y, idx, vals, axis=-1)`` with ``(idx, vals)`` from the If: every
    element's column index and checked value after a recovery, an empty ``[1, .., 1, 0]`` on the
    fault-free path.

    Why this form: onnxruntime lets ScatterElements write into Y's buffer (a clean run copies
    nothing) only when it can prove the output has Y's size. A scatter on Y itself (not on a
    ``Flatten`` of it, whose ``[1, ?]`` proves nothing) has Y's shape, and Y and the output get the
    same named symbolic dimensions (``dims``: None for a dimension shape inference left unnamed,
    such as the token axis after a Conv), so the proof holds with dynamic axes too. Measured on a
    ViT-S/16 with a dynamic token axis (CPU, batch 8, one thread): the copies cost 80 ms of 1250.
    (ScatterND never writes in place on onnxruntime's CPU provider.)"""
    rank = len(dims)
    named = [d if d is not None else f"{prefix}/d{i}" for i, d in enumerate(dims)]
    for t in (raw, s.out):
        main.value_info.append(helper.make_tensor_value_info(t, elem, named))
    shape = then_nb.op("Shape", raw)
    last = then_nb.op("Slice", shape, then_nb.ints([-1]), then_nb.ints([2**62]))
    cols = then_nb.op("Range", then_nb.const(np.int64(0), hint="zero"), then_nb.op("Squeeze", last),
                      then_nb.const(np.int64(1), hint="one"))
    then_idx = then_nb.op("Expand", cols, shape)
    then_vals = then_nb.op("Reshape", fixed, shape)
    empty = [1] * (rank - 1) + [0]
    else_idx = else_nb.op("Identity", else_nb.const(np.zeros(empty, np.int64), hint="noIndex"))
    else_vals = else_nb.op("Identity", else_nb.const(np.zeros(empty, helper.tensor_dtype_to_np_dtype(elem)),
                                                      hint="noValue"))
    then_outs = [helper.make_tensor_value_info(then_idx, TensorProto.INT64, [None] * rank),
                 helper.make_tensor_value_info(then_vals, elem, [None] * rank)]
    else_outs = [helper.make_tensor_value_info(else_idx, TensorProto.INT64, [None] * rank),
                 helper.make_tensor_value_info(else_vals, elem, [None] * rank)]
    fix_idx, fix_vals = f"{prefix}/fix_index", f"{prefix}/fix_values"
    outputs = _if_with_flags(main, then_nb, else_nb, s, prefix, then_outs, else_outs, [fix_idx, fix_vals], count,
                             expose, cond, recovery)
    main.op("ScatterElements", raw, fix_idx, fix_vals, axis=-1, outputs=[s.out])
    return outputs


def _if_with_flags(main: Nodes, then_nb: Nodes, else_nb: Nodes, s: GemmSite, prefix: str, then_outs: list,
                   else_outs: list, if_outputs: list, count: str, expose: bool, cond: str,
                   recovery: dict | None) -> list:
    """The If node (with the recompute counter and the detection flag when ``expose``)."""
    outputs = []
    if expose:
        zero = else_nb.const(np.int64(0), hint="zero")
        then_outs.append(helper.make_tensor_value_info(count, TensorProto.INT64, []))
        else_outs.append(helper.make_tensor_value_info(zero, TensorProto.INT64, []))
        rec_name = f"{FLAG_PREFIX}{s.name}.recomputed"
        det_name = f"{FLAG_PREFIX}{s.name}.detected"
        if_outputs.append(rec_name)
        main.op("Identity", cond, outputs=[det_name])
        outputs = [helper.make_tensor_value_info(det_name, TensorProto.BOOL, []),
                   helper.make_tensor_value_info(rec_name, TensorProto.INT64, [])]
    main.op("If", cond, outputs=if_outputs,
            then_branch=helper.make_graph(then_nb.nodes, f"{prefix}_recover", [], then_outs),
            else_branch=helper.make_graph(else_nb.nodes, f"{prefix}_pass", [], else_outs))
    if recovery is not None:
        set_meta(main.nodes[-1], RECOVERY_KEY, json.dumps(recovery))
    return outputs
