"""ABFT for Conv: a channel-checksum test with one ``If`` that recomputes the flagged items.

A convolution ``Y = Conv(X, W) + b`` with a constant weight ``W [Cout, Cin, k...]`` (group 1) is,
at every output position, a dot product of the same input patch with each of the Cout filters.
Summing over the output channels therefore gives one more convolution, with the summed filter:

    r = ReduceSum(Y, axis 1);  ref = Conv(X, sum_c W[c]) + sum(b);  scale = Conv(|X|, tau sum_c |W[c]|) + tau sum|b|
    flagged = NOT(|r - ref| <= scale)     (per item and output position; NaN and Inf are flagged)
    Y' = If(any(flagged), then = Y with the flagged items recomputed, else = Y)

This is the row-checksum test of the GEMM view of the convolution (M = output positions,
N = Cout, K = Cin x kernel size), built from two single-channel convolutions that ONNX Runtime
runs with its own Conv kernel, so the test needs no im2col. ``tau`` is the float32 rounding bound
gamma_{K + Cout + 4}, as for the GEMMs, so no fault-free input can be flagged.

Recovery recomputes the whole item (every item of a batch is its own unit, as for the GEMMs):
the patch embedding of a ViT, the one Conv there, is a small part of the model, and block-wise
recovery of a convolution would need an im2col gather. A Conv is therefore protected the same
way under ``lb``, ``standard`` and ``sec``, and the plan records it as ``recompute``.

Grouped and depthwise convolutions get one channel sum per group (a grouped Conv with one output
channel per group); 1-D and 3-D convolutions work the same way; a float16 Conv is checked in
float32 with the float16 rounding bound. Skipped (with the reason in the plan): a weight or bias
that is not constant, an output that is not float32/float16, a weight that does not fit the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from ..graph.checksums import Nodes, any_false, mark_recompute, reduce, unsqueeze
from .blocksize import p_faulty


@dataclass
class ConvSite:
    """One protectable (or skipped) Conv of the main graph."""

    name: str
    x: str
    out: str
    w: str = ""  # the weight and bias inputs of the Conv node (bias "" when it has none)
    b: str = ""
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: tuple = ()
    M: int | None = None  # output positions per item
    N: int | None = None  # output channels
    K: int | None = None  # input channels x kernel size (of one group)
    group: int = 1
    fp16: bool = False  # a float16 Conv: checked in float32 with the float16 rounding bound
    skip: str | None = None


def find_convs(m) -> list[ConvSite]:
    """Every Conv of the main graph, described (``m`` is abft's ``_Model``)."""
    return [_describe(m, n) for n in m.inferred.graph.node if n.op_type == "Conv"]


def _describe(m, node) -> ConvSite:
    s = ConvSite(name=node.name or node.output[0], x=node.input[0], out=node.output[0], w=node.input[1],
                 b=node.input[2] if len(node.input) > 2 else "")
    s.attrs = tuple(a for a in node.attribute)
    s.group = next((a.i for a in node.attribute if a.name == "group"), 1)
    vi = m.vi.get(s.out)
    if vi is None or vi.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        s.skip = "output is not float32 or float16"
        return s
    s.fp16 = vi.type.tensor_type.elem_type == TensorProto.FLOAT16
    w = m.const(node.input[1])
    if w is None:
        s.skip = "weight is not constant"
        return s
    if len(node.input) > 2 and node.input[2]:
        b = m.const(node.input[2])
        if b is None:
            s.skip = "bias is not constant"
            return s
        s.bias = np.asarray(b, np.float64).reshape(-1)
    s.weight = np.asarray(w, np.float64)
    if s.weight.ndim < 3 or s.weight.shape[0] % s.group:
        s.skip = f"weight shape {list(s.weight.shape)} does not fit group={s.group}"
        return s
    s.N = int(s.weight.shape[0]) // s.group  # output channels of one group: the terms of one channel sum
    s.K = int(np.prod(s.weight.shape[1:]))  # (input channels of one group) x kernel size
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) >= 3 and all(isinstance(d, int) and d > 0 for d in dims[2:]):
        s.M = int(np.prod(dims[2:]))
    return s


def tau_bound(K: int, n_sum: int) -> float:
    """Rounding bound on |sum(Y) - ref| / scale: gamma_{K + n_sum + 4} in float32 (K-term dot
    products, an n_sum-term sum, the checksum's own rounding and the bias add)."""
    n = K + n_sum + 4
    u = 2.0**-24
    return n * u / (1 - n * u)


def protect_conv(s: ConvSite, idx: int, opset: int, ber: float):
    """Main-graph test and recovery branch for one Conv. Returns (plan entry, main Nodes, then Nodes,
    raw name, fixed name, count name, cond name)."""
    prefix = f"onnxft.abft.c{idx:03d}"
    main = Nodes(prefix, opset)
    raw = f"{prefix}/unchecked"
    from .abft import _bound  # (the unit's bound, float16 rounding for a float16 Conv; lazy: abft imports us)
    tau = _bound(s, s.K, s.N)
    x, y = s.x, raw
    if s.fp16:  # checked in float32 (input and output cast), recomputed in float32, rounded to float16
        x, y = main.op("Cast", s.x, to=TensorProto.FLOAT), main.op("Cast", raw, to=TensorProto.FLOAT)
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in s.attrs}
    # one channel sum per group: the group's filters summed, a grouped Conv with one output channel
    # per group (for group 1 the sum over all channels; for depthwise it is the channel itself)
    g, per = s.group, s.N
    w_groups = s.weight.reshape(g, per, *s.weight.shape[1:])
    ws = w_groups.sum(axis=1).astype(np.float32)  # [g, Cin/g, k...]
    wabs = (tau * np.abs(w_groups).sum(axis=1)).astype(np.float32)
    ref = main.op("Conv", x, main.const(ws, hint="Wsum"), **conv_attrs)
    scale = main.op("Conv", main.op("Abs", x), main.const(wabs, hint="AbsWsum"), **conv_attrs)
    if s.bias is not None:
        spatial = [1] * (s.weight.ndim - 2)
        b_groups = s.bias.reshape(g, per)
        ref = main.op("Add", ref, main.const(b_groups.sum(1).reshape(1, g, *spatial).astype(np.float32),
                                             hint="biasSum"))
        scale = main.op("Add", scale, main.const((tau * np.abs(b_groups).sum(1)).reshape(1, g, *spatial)
                                                 .astype(np.float32), hint="biasAbs"))
    if g == 1:
        r = reduce(main, "ReduceSum", y, [1], keepdims=1)
    elif per == 1:
        r = y  # depthwise: each group's sum is its one channel
    else:  # [n, g * per, ...] -> [n, g, per, positions] summed over per; ref and scale to [n, g, positions]
        r = reduce(main, "ReduceSum", main.op("Reshape", y, main.ints([0, g, per, -1])), [2], keepdims=0)
        ref = main.op("Reshape", ref, main.ints([0, g, -1]))
        scale = main.op("Reshape", scale, main.ints([0, g, -1]))
    diff = main.op("Sub", r, ref)
    ok = main.op("LessOrEqual", main.op("Abs", diff), scale)
    cond = any_false(main, ok)

    # then: recompute the flagged items
    nb = Nodes(f"{prefix}/then", opset, branch=True)
    bad = nb.op("Where", ok, nb.const(np.float32(0)), nb.const(np.float32(1)))
    per_item = nb.op("Reshape", bad, nb.ints([0, -1]))
    items = nb.op("Reshape", nb.op("NonZero", nb.op("Cast", reduce(nb, "ReduceMax", per_item, [1], keepdims=0),
                                                        to=TensorProto.BOOL)), nb.ints([-1]))
    w_name = nb.const(s.weight.astype(np.float32), hint="W")
    ins = [nb.op("Gather", x, items, axis=0), w_name]
    if s.bias is not None:
        ins.append(nb.const(s.bias.astype(np.float32), hint="b"))
    y_new = nb.op("Conv", *ins, **conv_attrs)
    item_idx = unsqueeze(nb, items, [1])
    mark_recompute(nb, y_new, item_idx, raw)  # (bias included: a Conv site's bias add is one of its operations)
    fixed = nb.op("ScatterND", raw, item_idx, nb.op("Cast", y_new, to=TensorProto.FLOAT16) if s.fp16 else y_new)
    per_item_elems = nb.op("Div", nb.op("Size", raw), nb.op("Gather", nb.op("Shape", raw), nb.ints(0), axis=0))
    count = nb.op("Mul", nb.op("Size", items), per_item_elems)
    costs = conv_cost(s.M * s.group, s.N, s.K, ber) if s.M else {}  # (groups: more rows of the GEMM view)
    entry = {"name": s.name, "op_type": "Conv", "output": s.out, "M": s.M, "N": s.N, "K": s.K, "group": s.group,
             "scheme": "recompute", "tau": tau, "tau_source": "rounding bound" + (" (float16 unit)" if s.fp16 else ""),
             "has_bias": s.bias is not None,
             "main_graph_nodes": len(main.nodes),
             "ops_gemm": (s.M * s.N * s.group * 2 * s.K) if s.M else None,
             "ops_detection": costs.get("detection"), "ops_expected_recovery": costs.get("recovery"),
             "p_gemm_faulty": costs.get("p_faulty")}
    return entry, main, nb, raw, fixed, count, cond


def conv_cost(M: int, N: int, K: int, ber: float, bits: int = 32) -> dict:
    """Expected operations per item: the test (two single-channel convolutions, 2 x 2MK; the
    channel sums, MN; compare, 3M) always; the item recomputed (2MNK) when it is faulty."""
    p = p_faulty(M * N * 2 * K, ber, bits)
    det = 4 * M * K + M * N + 3 * M
    rec = p * 2 * M * N * K
    return {"detection": det, "recovery": rec, "total": det + rec, "p_faulty": p}
