"""Checksum subgraph builders for ABFT: plain functions that take a ``Nodes`` list and tensor names
and return the names of the tensors they compute.

Every builder emits standard ONNX valid at the ``Nodes``' opset (13 and later): the reduce
helper picks the attribute or the input form of ``axes`` per op and opset, so a hardened model
keeps its original opset. Each builder is unit-tested on onnxruntime against numpy
(tests/test_abft_builders.py).

Shapes follow one convention: ``A [..., M, K]``, ``B [..., K, N]`` (or ``[K, N]`` shared by the
whole batch), ``Y [..., M, N]``; per-row quantities keep a trailing axis of 1 (``[..., M, 1]``)
so they broadcast against each other without reshapes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .roles import PROTECTION, RECOMPUTE_KEY, set_meta, set_role

# Opset from which ``axes`` is an input rather than an attribute.
_AXES_INPUT_FROM = {"ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18, "ReduceL1": 18, "ReduceMean": 18,
                    "ReduceL2": 18, "ReduceProd": 18, "ReduceSumSquare": 18, "ReduceLogSumExp": 18,
                    "Squeeze": 13, "Unsqueeze": 13}


class Nodes:
    """A node list under one name prefix, for one graph (the main graph or an ``If`` branch).

    ``const`` makes an initializer in the main graph and a ``Constant`` node inside a branch
    (``branch=True``), so branch bodies are self-contained. Every node gets role "protection".
    """

    def __init__(self, prefix: str, opset: int, branch: bool = False):
        self.prefix = prefix
        self.opset = opset
        self.branch = branch
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # shape annotations for the main graph
        self._n = 0

    def name(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}/{hint}{self._n}"

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, n_out: int = 1, **attrs):
        outs = outputs or [self.name(op_type) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), list(outs), name=self.name(f"{op_type}_n"), **attrs)
        self.nodes.append(set_role(node, PROTECTION))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        name = self.name(hint)
        tensor = numpy_helper.from_array(arr, name)
        if self.branch:
            self.op("Constant", outputs=[name], value=tensor)
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), hint="i")


def mark_recompute(nb: Nodes, value: str, index: str, target: str) -> None:
    """Mark the recovery-branch node that computes ``value``: recomputed outputs (before any bias
    add of a MatMul unit) that enter the output as ``ScatterND(target, index, value)`` (``target``:
    a tensor of the output's shape). ``inject`` reads the mark under --inject-protection to fault
    exactly the recomputed elements; it changes nothing the hardened graph computes."""
    node = next(n for n in nb.nodes if value in n.output)
    set_meta(node, RECOMPUTE_KEY, json.dumps({"index": index, "target": target}))


def reduce(nb: Nodes, op_type: str, x: str, axes: list[int] | None, keepdims: int = 1) -> str:
    """``op_type`` (ReduceSum, ReduceMax, ReduceL1, ...) over ``axes`` (None: all axes) in the form
    the opset expects: ``axes`` as an input from opset 13 (ReduceSum) or 18 (the others)."""
    if axes is None:
        return nb.op(op_type, x, keepdims=keepdims)
    if nb.opset >= _AXES_INPUT_FROM[op_type]:
        return nb.op(op_type, x, nb.ints(axes), keepdims=keepdims)
    return nb.op(op_type, x, axes=list(axes), keepdims=keepdims)


def unsqueeze(nb: Nodes, x: str, axes: list[int]) -> str:
    if nb.opset >= _AXES_INPUT_FROM["Unsqueeze"]:
        return nb.op("Unsqueeze", x, nb.ints(axes))
    return nb.op("Unsqueeze", x, axes=list(axes))


# ----------------------------------------------------------------------------------------------
# offline checksums of constant operands
# ----------------------------------------------------------------------------------------------


def weight_checksum_vectors(be: np.ndarray, abe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``B e`` and ``tau |B| e`` (float64) rounded to the float32 constants the test reads. Where
    ``B e`` lands below float32's normal range its rounding errs by up to 2^-150 absolutely, not
    relatively, and ``ref = A (B e)`` carries ``|a_k|`` times that: the matching entry of ``tau |B|
    e`` (which multiplies the same ``|a_k|`` in the scale) is raised by at least 2^-149 to cover it
    (``passes.thresholds.underflow_term`` counts every other underflow)."""
    be64, abe64 = np.asarray(be, np.float64), np.asarray(abe, np.float64)
    be32, abe32 = be64.astype(np.float32), abe64.astype(np.float32)
    sub = (np.abs(be64) < 2.0**-126) & (be32.astype(np.float64) != be64)
    if sub.any():
        raised = np.maximum((abe64 + 2.0**-148).astype(np.float32), np.nextafter(abe32, np.float32(np.inf)))
        abe32 = np.where(sub, raised, abe32)
    return be32, abe32


def weight_checksums(b: np.ndarray, tau: float, bias: np.ndarray | None = None,
                     indicator: np.ndarray | None = None):
    """Row checksums of a constant ``B [K, N]``, computed in float64 and rounded once.

    Returns ``(B e, tau |B| e, sum(bias), tau sum|bias|)`` with ``e`` = ones ``[N, 1]`` or the
    given 0/1 ``indicator [N, nb]`` (column-block sums for LB-ABFT). The bias terms are None
    without a bias.
    """
    b64 = np.asarray(b, np.float64)
    e = np.ones((b64.shape[-1], 1)) if indicator is None else np.asarray(indicator, np.float64)
    be, abe = weight_checksum_vectors(b64 @ e, tau * (np.abs(b64) @ e))
    if bias is None:
        return be, abe, None, None
    bias64 = np.asarray(bias, np.float64).reshape(1, -1)
    return be, abe, (bias64 @ e).astype(np.float32), (tau * (np.abs(bias64) @ e)).astype(np.float32)


def block_indicator(n: int, b: int) -> np.ndarray:
    """0/1 matrix ``[n, ceil(n/b)]``: column ``J`` selects the indices of block ``J`` (width ``b``)."""
    nb = -(-n // b)
    e = np.zeros((n, nb), np.float32)
    e[np.arange(n), np.arange(n) // b] = 1
    return e


# ----------------------------------------------------------------------------------------------
# run-time builders
# ----------------------------------------------------------------------------------------------


def runtime_checksums(nb: Nodes, b: str, indicator: str | None = None) -> tuple[str, str]:
    """``(B e, |B| e)`` of an activation ``B [..., K, N]``: ``[..., K, 1]`` row sums and L1 norms,
    or ``[..., K, nb]`` column-block sums with a 0/1 ``indicator [N, nb]``."""
    if indicator is None:  # (ReduceSum of Abs: onnxruntime's ReduceL1 is ~5x slower)
        return reduce(nb, "ReduceSum", b, [-1]), reduce(nb, "ReduceSum", nb.op("Abs", b), [-1])
    return nb.op("MatMul", b, indicator), nb.op("MatMul", nb.op("Abs", b), indicator)


def checksum_test(nb: Nodes, y_sums: str, a: str, be: str, abe: str, tau: str | None = None,
                  bias_sum: str | None = None, bias_abs: str | None = None,
                  eta: str | None = None) -> tuple[str, str, str]:
    """Compare observed sums of ``Y`` with ``A @ (B e)``.

    ``y_sums``: sums of ``Y`` (row sums ``[..., M, 1]`` or block sums ``[..., M, nb]``); ``be``,
    ``abe``: ``B e`` and ``|B| e`` (with tau already folded into ``abe`` when ``tau`` is None).
    Returns ``(ok, diff, scale)``: ``ok = |y_sums - A @ Be| <= tau * |A| @ |B|e`` (+ bias
    terms) ``+ eta`` (the absolute underflow term, ``passes.thresholds.underflow_term``), False
    wherever the difference is NaN or infinite.
    """
    ref = nb.op("MatMul", a, be)
    if bias_sum is not None:
        ref = nb.op("Add", ref, bias_sum)
    diff = nb.op("Sub", y_sums, ref)
    scale = nb.op("MatMul", nb.op("Abs", a), abe)
    if tau is not None:
        scale = nb.op("Mul", scale, tau)
    if bias_abs is not None:
        scale = nb.op("Add", scale, bias_abs)
    if eta is not None:
        scale = nb.op("Add", scale, eta)
    ok = nb.op("LessOrEqual", nb.op("Abs", diff), scale)
    return ok, diff, scale


def any_false(nb: Nodes, ok: str) -> str:
    """Scalar bool: some element of the bool tensor ``ok`` is False (ReduceMax of 0/1 floats,
    because the Reduce ops take no bool before opset 20)."""
    bad = nb.op("Where", ok, nb.const(np.float32(0)), nb.const(np.float32(1)))
    return nb.op("Cast", reduce(nb, "ReduceMax", bad, None, keepdims=0), to=TensorProto.BOOL)


def count_true(nb: Nodes, flags: str, axes: list[int] | None, keepdims: int = 0) -> str:
    """int64 count of True in ``flags`` over ``axes``."""
    return reduce(nb, "ReduceSum", nb.op("Cast", flags, to=TensorProto.INT64), axes, keepdims)


def weight_row_test(nb: Nodes, y: str, a: str, be: np.ndarray, abe: np.ndarray, tau: str | None = None,
                    bias_sum: float | None = None, bias_abs: float | None = None,
                    a_lower: float | None = None, eta: float | str | None = None) -> tuple[str, str, str]:
    """Row-checksum test of ``Y [..., M, N] = A [..., M, K] @ B (+ bias)`` for a constant ``B``,
    built for speed on the fault-free path:

        r = ReduceSum(Y, -1);  ref = A @ be (+ bias_sum);  scale = |A| @ abe (+ bias_abs) (+ eta)
        ok = |r - ref| <= scale          (times ``tau`` when it is a run-time tensor; False for NaN/Inf)

    ``be [K]`` = B e and ``abe [K]`` = tau |B| e (tau folded in when known; ``bias_abs`` likewise),
    float64, rounded here (``weight_checksum_vectors``). ``eta``: the absolute underflow term
    (``passes.thresholds.underflow_term``), folded into the ``bias_abs`` constant when tau is (one
    add), else added after the run-time ``tau``'s multiply (a float or a tensor name).
    The two products are Einsum ``...k,k->...``: onnxruntime runs MatMul with a one-column B
    through its GEMM kernel at a tenth of the speed (measured: [8,197,768] x [768]: 76 us with
    Einsum, 767 us with MatMul, one thread). Returns ``(ok, diff, scale)``, each ``[..., M]``.

    ``a_lower = c`` when ``A >= -c`` everywhere (0 after a ReLU or Softmax, 0.17 after a GELU):
    ``|A| @ abe <= A @ abe + 2 c sum(abe)``, so the scale needs no ``Abs`` pass over ``A`` (exact
    for ``c = 0``; for ``c > 0`` only the negative entries, each above ``-c``, are over-counted).
    """
    be, abe = weight_checksum_vectors(np.asarray(be).reshape(-1), np.asarray(abe).reshape(-1))
    r = reduce(nb, "ReduceSum", y, [-1], keepdims=0)
    ref = nb.op("Einsum", a, nb.const(be, hint="Be"), equation="...k,k->...")
    if bias_sum is not None:
        ref = nb.op("Add", ref, nb.const(np.float32(bias_sum), hint="biasSum"))
    diff = nb.op("Sub", r, ref)
    abs_a = nb.op("Abs", a) if a_lower is None else a
    scale = nb.op("Einsum", abs_a, nb.const(abe, hint="AbsBe"), equation="...k,k->...")
    if a_lower:
        bias_abs = (bias_abs or 0.0) + 2.0 * a_lower * float(np.sum(abe, dtype=np.float64))
    folded = tau is None and eta is not None and not isinstance(eta, str)
    if folded:
        bias_abs = (bias_abs or 0.0) + float(eta)
    if bias_abs is not None:
        scale = nb.op("Add", scale, nb.const(np.float32(bias_abs), hint="biasAbs"))
    if tau is not None:
        scale = nb.op("Mul", scale, tau)
    if eta is not None and not folded:
        scale = nb.op("Add", scale, eta if isinstance(eta, str) else nb.const(np.float32(eta), hint="eta"))
    ok = nb.op("LessOrEqual", nb.op("Abs", diff), scale)
    return ok, diff, scale


def activation_row_test(nb: Nodes, y: str, a: str, b: str, tau: str, b_shared: bool = False,
                        bias_sum: str | None = None, bias_abs: str | None = None,
                        a_nonnegative: bool = False, eta: str | None = None) -> tuple[str, str, str]:
    """Row-checksum test of ``Y = A @ B`` for an activation ``B [..., K, N]`` (or ``[K, N]`` shared
    by the batch when ``b_shared``), checksums at run time:

        be = ReduceSum(B, -1);  abe = ReduceSum(|B|, -1)                       ([..., K])
        ok = |ReduceSum(Y, -1) - A @ be (- bias_sum)| <= tau * |A| @ abe (+ bias_abs) (+ eta)

    The products are Einsum with broadcast batch dims (8x faster than MatMul with a one-column
    B for [8,12,197,64] operands). Returns ``(ok, diff, scale)``, each ``[..., M]``.
    """
    if a_nonnegative and not b_shared:
        # |A| = A (a Softmax output: attention x V): one MatMul of A with [be, tau |B| e] gives both
        # the reference and the scale, one pass over the largest tensor of attention instead of three.
        be_col = reduce(nb, "ReduceSum", b, [-1], keepdims=1)  # [..., K, 1]
        abe_col = nb.op("Mul", reduce(nb, "ReduceSum", nb.op("Abs", b), [-1], keepdims=1), tau)
        both = nb.op("MatMul", a, nb.op("Concat", be_col, abe_col, axis=-1))  # [..., M, 2]
        ref = nb.op("Gather", both, nb.const(np.int64(0), hint="col"), axis=-1)
        scale = nb.op("Gather", both, nb.const(np.int64(1), hint="col"), axis=-1)
        if bias_sum is not None:
            ref = nb.op("Add", ref, bias_sum)
        if bias_abs is not None:
            scale = nb.op("Add", scale, bias_abs)
        if eta is not None:
            scale = nb.op("Add", scale, eta)
        diff = nb.op("Sub", reduce(nb, "ReduceSum", y, [-1], keepdims=0), ref)
        return nb.op("LessOrEqual", nb.op("Abs", diff), scale), diff, scale
    eq = "...k,k->..." if b_shared else "...mk,...k->...m"
    be = reduce(nb, "ReduceSum", b, [-1], keepdims=0)
    abe = reduce(nb, "ReduceSum", nb.op("Abs", b), [-1], keepdims=0)
    ref = nb.op("Einsum", a, be, equation=eq)
    if bias_sum is not None:
        ref = nb.op("Add", ref, bias_sum)
    diff = nb.op("Sub", reduce(nb, "ReduceSum", y, [-1], keepdims=0), ref)
    scale = nb.op("Mul", nb.op("Einsum", nb.op("Abs", a), abe, equation=eq), tau)
    if bias_abs is not None:
        scale = nb.op("Add", scale, bias_abs)
    if eta is not None:
        scale = nb.op("Add", scale, eta)
    ok = nb.op("LessOrEqual", nb.op("Abs", diff), scale)
    return ok, diff, scale


def fused_row_test(nb: Nodes, y: str, z: str, n: int, scale_in_z: bool, a: str | None = None,
                   abe: np.ndarray | None = None, scale_add: float | None = None) -> tuple[str, str, str]:
    """Row-checksum test of a GEMM computed against a widened constant weight ``[B | Be | tau|B|e]``:
    ``z [..., M, n + 1 (+1)]`` holds ``Y`` in its first ``n`` columns, ``A (B e)`` (+ the bias sum)
    in column ``n`` and, when ``scale_in_z``, ``A (tau |B| e)`` (+ tau sum|bias|) in column ``n + 1``
    (exact for the scale only when ``A >= -c``: ``scale_add`` carries ``2 c sum(tau |B| e)``, and
    the absolute underflow term ``eta``);
    otherwise the scale is ``|A| @ abe`` (a pass over ``A``). No pass over ``A`` for the reference.
    Returns ``(ok, diff, scale)``, each ``[..., M, 1]``."""
    def col(i):
        return nb.op("Slice", z, nb.ints([i]), nb.ints([i + 1]), nb.ints([-1]))

    ref = col(n)
    diff = nb.op("Sub", reduce(nb, "ReduceSum", y, [-1], keepdims=1), ref)
    if scale_in_z:
        scale = col(n + 1)
    else:
        scale = unsqueeze(nb, nb.op("Einsum", nb.op("Abs", a), nb.const(np.asarray(abe, np.float32).reshape(-1),
                                                                       hint="AbsBe"), equation="...k,k->..."), [-1])
    if scale_add:
        scale = nb.op("Add", scale, nb.const(np.float32(scale_add), hint="scaleAdd"))
    ok = nb.op("LessOrEqual", nb.op("Abs", diff), scale)
    return ok, diff, scale


def duplicate_test(nb: Nodes, y: str, y_neg: str) -> str:
    """Duplicate-and-compare: ``ok = (Y == -Y2)`` elementwise, where ``Y2`` is the same product
    computed with the weight (and bias) negated. Negation is exact and round-to-nearest is
    symmetric, so a fault-free ``Y2`` is exactly ``-Y`` bit for bit, whatever order the kernel
    sums in, as long as both products run the same kernel (measured: docs/abft.md). A NaN compares unequal."""
    return nb.op("Equal", y, nb.op("Neg", y_neg))
