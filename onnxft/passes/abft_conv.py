"""ABFT for Conv: a channel-checksum test with one ``If`` that recomputes the flagged items.

A convolution ``Y = Conv(X, W) + b`` with a constant weight ``W [Cout, Cin, k...]`` (group 1) is,
at every output position, a dot product of the same input patch with each of the Cout filters.
Summing over the output channels therefore gives one more convolution, with the summed filter:

    r = ReduceSum(Y, axis 1);  ref = Conv(X, sum_c W[c]) + sum(b)
    scale = Conv(|X|, tau sum_c |W[c]|) + tau sum|b| + eta        (eta: thresholds.underflow_term)
    flagged = NOT(|r - ref| <= scale)     (per item and output position; NaN and Inf are flagged)
    Y' = If(any(flagged), then = Y with the flagged items recomputed, else = Y)

This is the row-checksum test of the GEMM view of the convolution (M = output positions,
N = Cout, K = Cin x kernel size), built from two single-channel convolutions that ONNX Runtime
runs with its own Conv kernel, so the test needs no im2col. ``tau`` is the rounding bound of
``passes.thresholds`` (K-term dot products, Cout-term sums, at the serving precision), as for the
GEMMs, so no fault-free input can be flagged.

Recovery recomputes the whole item (every item of a batch is its own unit, as for the GEMMs):
the patch embedding of a ViT, the one Conv there, is a small part of the model, and block-wise
recovery of a convolution would need an im2col gather. A Conv is therefore protected the same
way under ``lb``, ``standard`` and ``sec``, and the plan records it as ``recompute``.

Grouped and depthwise convolutions get one channel sum per group (a grouped Conv with one output
channel per group; for a depthwise Conv that "sum" is its own scaled filter, computed by main-graph
nodes on the weight that onnxruntime folds at load rather than stored again: ``_depthwise_sums``); 1-D and 3-D convolutions work the same way; a float16 Conv is checked in
float32 with the bound at ``thresholds.unit_precision(precision, fp16=True)``. The BatchNorm /
per-channel Add/Mul / residual chain after a Conv joins its unit for every group count
(``_absorb_fusable``): scales fold into each channel's filter before the per-group sums.
A ``ConvTranspose`` (group 1) is checked the same way: summing its output over the channels is a
ConvTranspose with ``W [Cin, Cout, k...]`` summed over axis 1, with the node's own attributes.
Skipped (with the reason in the plan): a weight or bias that is not constant, an output that is
not float32/float16, a weight that does not fit the group, a grouped ConvTranspose.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from ..graph.checksums import Nodes, any_false, mark_recompute, reduce, unsqueeze, weight_checksum_vectors
from .blocksize import p_faulty
from .thresholds import DEFAULT_PRECISION, tau_bound, underflow_term, unit_precision


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
    # per-channel affine ops after the Conv that join the unit (BatchNormalization, Add/Mul of a
    # constant) and a residual Add: onnxruntime fuses them into the Conv, so the check reads the
    # end of the chain and the fusion still happens (fault-free outputs stay bit-identical)
    post: list = field(default_factory=list)  # the absorbed nodes, in order
    scale: np.ndarray | None = None  # y_end = scale_c * conv_c (no bias) + shift_c (+ residual)
    shift: np.ndarray | None = None
    shift_abs: np.ndarray | None = None  # magnitude of every constant that entered shift
    residual: str | None = None
    post_roundings: int = 0
    conv_out: str = ""  # the Conv node's own output
    op_type: str = "Conv"  # or ConvTranspose (group 1): ``weight`` then holds W transposed to [Cout, Cin, k...]
    w_folds: bool = False  # W is an initializer or Constant (through Identity/Transpose): nodes on it fold at load


def find_convs(m) -> list[ConvSite]:
    """Every Conv of the main graph, described (``m`` is abft's ``_Model``)."""
    sites = [_describe(m, n) for n in m.inferred.graph.node
             if n.op_type in ("Conv", "ConvTranspose") and n.domain in ("", "ai.onnx")]
    claimed: set = set()
    for c in sites:  # a residual Add of two Convs joins the first one's unit only
        names = {id(n) for n in c.post}
        if names & claimed:
            _drop_absorbed(c)
        claimed |= {id(n) for n in c.post}
    return sites


def _drop_absorbed(c: ConvSite) -> None:
    c.out = c.conv_out
    c.post, c.scale, c.shift, c.shift_abs, c.residual, c.post_roundings = [], None, None, None, None, 0


def _describe(m, node) -> ConvSite:
    s = ConvSite(name=node.name or node.output[0], x=node.input[0], out=node.output[0], w=node.input[1],
                 b=node.input[2] if len(node.input) > 2 else "", conv_out=node.output[0], op_type=node.op_type)
    s.attrs = tuple(a for a in node.attribute)
    s.group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if s.op_type == "ConvTranspose" and s.group != 1:
        s.skip = "grouped ConvTranspose is not protected yet"
        return s
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
    s.w_folds = folds_at_load(m, s.w)
    if s.op_type == "ConvTranspose" and s.weight.ndim >= 3:
        # W [Cin, Cout, k...]: each output channel's sum over channels is a ConvTranspose with the
        # filters summed over axis 1; held as [Cout, Cin, k...] so the sums below read as for a Conv
        # (K, the terms of one output element, is then bounded by Cin x kernel size)
        s.weight = np.swapaxes(s.weight, 0, 1)
    if s.weight.ndim < 3 or s.weight.shape[0] % s.group:
        s.skip = f"weight shape {list(s.weight.shape)} does not fit group={s.group}"
        return s
    s.N = int(s.weight.shape[0]) // s.group  # output channels of one group: the terms of one channel sum
    s.K = int(np.prod(s.weight.shape[1:]))  # (input channels of one group) x kernel size
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) >= 3 and all(isinstance(d, int) and d > 0 for d in dims[2:]):
        s.M = int(np.prod(dims[2:]))
    _absorb_fusable(m, s, len(dims))
    return s


def folds_at_load(m, name: str, depth: int = 0) -> bool:
    """``name`` is an initializer or a ``Constant`` output, through Identity and Transpose nodes
    (tf2onnx's HWIO -> OIHW): onnxruntime constant-folds nodes computed from it at load. (Not a
    DequantizeLinear output: onnxruntime keeps those unfolded for its QDQ fusions.)"""
    n = m.producers.get(name)
    if n is None:  # (an initializer that is also a graph input can be overridden: not constant)
        return name in m.inits and name not in {i.name for i in m.inferred.graph.input}
    if n.op_type == "Constant":
        return True
    return n.op_type in ("Identity", "Transpose") and depth < 8 and folds_at_load(m, n.input[0], depth + 1)


def _channel_vector(c, n: int, rank: int):
    """A constant that broadcasts per output channel (scalar, [N,1,..,1] or [1,N,1,..,1]) as [N]."""
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return np.full(n, float(c.reshape(())))
    shape = list(c.shape)
    if len(shape) == rank and shape[1] == n and c.size == n and shape[0] == 1:
        return c.reshape(n)
    if len(shape) == rank - 1 and shape[0] == n and c.size == n:
        return c.reshape(n)
    return None


def _absorb_fusable(m, s: ConvSite, rank: int) -> None:
    """Extend the unit over what onnxruntime fuses into a Conv: BatchNormalization, Add or Mul of a
    per-channel constant, then at most one Add of a same-shaped activation (a residual), each the
    only consumer of the previous tensor. The channel sum of the chain's output is still one
    convolution: ``sum_c y_c = Conv(X, sum_c scale_c W_c) + sum_c shift_c (+ sum_c residual_c)``."""
    n = s.N * s.group  # every output channel
    scale, shift = np.ones(n), (s.bias.copy() if s.bias is not None else np.zeros(n))
    shift_abs, rounds, cur = np.abs(shift), 0, s.out
    out_dims = m.vi.get(s.out)
    while True:
        cons = m.consumers.get(cur, [])
        if len(cons) != 1 or cur in m.outputs:
            break
        nxt = cons[0]
        if nxt.op_type == "BatchNormalization" and nxt.input[0] == cur and len(nxt.output) == 1:
            p = [m.const(t) for t in nxt.input[1:5]]
            if any(v is None for v in p):
                break
            gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in p)
            eps = next((a.f for a in nxt.attribute if a.name == "epsilon"), 1e-5)
            k = gamma / np.sqrt(var + eps)
            scale, shift = scale * k, (shift - mean) * k + beta
            shift_abs = (shift_abs + np.abs(mean)) * np.abs(k) + np.abs(beta)
            rounds += 6  # k's own sqrt, add and divide; the multiply and add; the folded weight's rounding
        elif nxt.op_type in ("Add", "Mul") and cur in nxt.input[:2]:
            other = nxt.input[1] if nxt.input[0] == cur else nxt.input[0]
            c = m.const(other)
            if c is not None:
                v = _channel_vector(c, n, rank)
                if v is None:
                    break
                if nxt.op_type == "Add":
                    shift, shift_abs = shift + v, shift_abs + np.abs(v)
                    rounds += 1
                else:
                    scale, shift, shift_abs = scale * v, shift * v, shift_abs * np.abs(v)
                    rounds += 2  # the multiply, and the folded weight's rounding
            elif (nxt.op_type == "Add" and other not in (cur, s.conv_out)
                  and m.vi.get(other) is not None and out_dims is not None
                  and m.vi[other].type.tensor_type.shape == out_dims.type.tensor_type.shape
                  and all(d.HasField("dim_value") or d.dim_param for d in out_dims.type.tensor_type.shape.dim)):
                s.residual = other
                rounds += 1
                s.post.append(nxt)
                cur = nxt.output[0]
                break
            else:
                break
        else:
            break
        s.post.append(nxt)
        cur = nxt.output[0]
    if s.post:
        s.out, s.scale, s.shift, s.shift_abs, s.post_roundings = cur, scale, shift, shift_abs, rounds


def protect_conv(s: ConvSite, idx: int, opset: int, ber: float, precision: str = DEFAULT_PRECISION):
    """Main-graph test and recovery branch for one Conv. Returns (plan entry, main Nodes, then Nodes,
    raw name, fixed name, count name, cond name)."""
    prefix = f"onnxft.abft.c{idx:03d}"
    main = Nodes(prefix, opset)
    raw = f"{prefix}/unchecked"
    prec = unit_precision(precision, s.fp16)
    if s.post:  # (a fused kernel adds the bias and the residual as two more terms of the dot product)
        tau = tau_bound(s.K + 2, s.N, prec, extra_roundings=s.post_roundings + 1,
                        runtime_checksums=s.residual is not None)
        eta = underflow_term(s.K + 2, s.N, prec, extra_roundings=s.post_roundings + 1,
                             runtime_checksums=s.residual is not None)
        chan = s.scale.reshape((-1,) + (1,) * (s.weight.ndim - 1))
        shift, shift_abs = s.shift, s.shift_abs
    else:
        tau = tau_bound(s.K, s.N, prec, extra_roundings=1 if s.bias is not None else 0)
        eta = underflow_term(s.K, s.N, prec, extra_roundings=1 if s.bias is not None else 0)
        chan = 1.0
        shift = s.bias if s.bias is not None else None
        shift_abs = np.abs(s.bias) if s.bias is not None else None
    x, y, residual = s.x, raw, s.residual
    if s.fp16:  # checked in float32 (input and output cast), recomputed in float32, rounded to float16
        x, y = main.op("Cast", s.x, to=TensorProto.FLOAT), main.op("Cast", raw, to=TensorProto.FLOAT)
        if residual is not None:
            residual = main.op("Cast", residual, to=TensorProto.FLOAT)
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in s.attrs}
    # one channel sum per group: the group's (scaled) filters summed, a grouped Conv with one output
    # channel per group (for group 1 the sum over all channels; for depthwise it is the channel itself)
    g, per = s.group, s.N
    spatial = [1] * (s.weight.ndim - 2)
    w_groups = (s.weight * chan).reshape(g, per, *s.weight.shape[1:])
    # [g, Cin/g, k...]; a channel sum below float32's normal range raises its scale entry
    # (weight_checksum_vectors); every other underflow is in eta, added to the scale
    abs_sums = tau * np.abs(w_groups).sum(axis=1)
    ws, wabs = weight_checksum_vectors(w_groups.sum(axis=1), abs_sums)
    if per == 1 and g > 1 and s.w_folds and np.array_equal(wabs, abs_sums.astype(np.float32)):
        # depthwise: the "sums" are the scaled filter itself, folded at load from the weight (no copy)
        ws, wabs = _depthwise_sums(main, s.w, chan, tau)
    else:
        if s.op_type == "ConvTranspose":  # back to ConvTranspose's layout: [Cin, 1, k...]
            ws, wabs = np.swapaxes(ws, 0, 1).copy(), np.swapaxes(wabs, 0, 1).copy()
        ws, wabs = main.const(ws, hint="Wsum"), main.const(wabs, hint="AbsWsum")
    ref = main.op(s.op_type, x, ws, **conv_attrs)
    scale = main.op(s.op_type, main.op("Abs", x), wabs, **conv_attrs)
    if shift is not None:
        ref = main.op("Add", ref, main.const(shift.reshape(g, per).sum(1).reshape(1, g, *spatial)
                                             .astype(np.float32), hint="biasSum"))
        # (eta folded into the per-channel constant, rounded once: onnxruntime fuses the Add into
        # the check Conv's bias, so no pass over the output runs for it)
        scale = main.op("Add", scale, main.const((tau * shift_abs.reshape(g, per).sum(1) + eta)
                                                 .reshape(1, g, *spatial).astype(np.float32), hint="biasAbs"))
    else:  # (a per-channel constant, not a scalar: the same fusion applies)
        scale = main.op("Add", scale, main.const(np.full((1, g, *spatial), eta, np.float32), hint="eta"))

    def group_sums(t: str) -> str:
        """[n, g * per, ...] -> the channel sum of each group: [n, 1, ...] (g = 1), the tensor itself
        (depthwise), else [n, g, positions]."""
        if g == 1:
            return reduce(main, "ReduceSum", t, [1], keepdims=1)
        if per == 1:
            return t
        return reduce(main, "ReduceSum", main.op("Reshape", t, main.ints([0, g, per, -1])), [2], keepdims=0)

    if g > 1 and per > 1:  # ref and scale to [n, g, positions]
        ref = main.op("Reshape", ref, main.ints([0, g, -1]))
        scale = main.op("Reshape", scale, main.ints([0, g, -1]))
    if residual is not None:
        ref = main.op("Add", ref, group_sums(residual))
        scale = main.op("Add", scale, main.op("Mul", group_sums(main.op("Abs", residual)),
                                              main.const(np.float32(tau), hint="tau")))
    r = group_sums(y)
    diff = main.op("Sub", r, ref)
    ok = main.op("LessOrEqual", main.op("Abs", diff), scale)
    cond = any_false(main, ok)

    # then: recompute the flagged items
    nb = Nodes(f"{prefix}/then", opset, branch=True)
    bad = nb.op("Where", ok, nb.const(np.float32(0)), nb.const(np.float32(1)))
    per_item = nb.op("Reshape", bad, nb.ints([0, -1]))
    items = nb.op("Reshape", nb.op("NonZero", nb.op("Cast", reduce(nb, "ReduceMax", per_item, [1], keepdims=0),
                                                        to=TensorProto.BOOL)), nb.ints([-1]))
    # the Conv's own weight and bias, read from the main graph by name (outer scope): no copy (a
    # float16 Conv's are cast to float32 in the main graph, which onnxruntime folds at load)
    w_name, b_name = s.w, s.b
    if s.fp16:
        w_name = main.op("Cast", s.w, to=TensorProto.FLOAT)
        b_name = main.op("Cast", s.b, to=TensorProto.FLOAT) if s.bias is not None else s.b
    ins = [nb.op("Gather", x, items, axis=0), w_name]
    if s.bias is not None:
        ins.append(b_name)
    y_new = nb.op(s.op_type, *ins, **conv_attrs)
    item_idx = unsqueeze(nb, items, [1])
    mark_recompute(nb, y_new, item_idx, raw)  # (bias included: a Conv site's bias add is one of its operations)
    if s.fp16:  # (the absorbed ops then run in float16, as in the model)
        y_new = nb.op("Cast", y_new, to=TensorProto.FLOAT16)
    # the chain's running tensor is the Conv's output, whichever input of the first absorbed op it is
    # (a commuted Mul/Add(constant, conv) names the constant first)
    prev = s.conv_out
    for node in s.post:  # the absorbed ops again, on the recomputed items
        ins = [y_new if t == prev else (nb.op("Gather", t, items, axis=0) if t == s.residual else t) for t in node.input]
        y_new = nb.op(node.op_type, *ins, **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        prev = node.output[0]
    fixed = nb.op("ScatterND", raw, item_idx, y_new)
    per_item_elems = nb.op("Div", nb.op("Size", raw), nb.op("Gather", nb.op("Shape", raw), nb.ints(0), axis=0))
    count = nb.op("Mul", nb.op("Size", items), per_item_elems)
    costs = conv_cost(s.M * s.group, s.N, s.K, ber) if s.M else {}  # (groups: more rows of the GEMM view)
    entry = {"name": s.name, "op_type": s.op_type, "output": s.out, "M": s.M, "N": s.N, "K": s.K, "group": s.group,
             "scheme": "recompute", "tau": tau, "eta": eta,
             "tau_source": "rounding bound" + (" (float16 unit)" if s.fp16 else ""),
             "precision": prec.name, "has_bias": s.bias is not None,
             "absorbed": [n.name or n.output[0] for n in s.post],
             "main_graph_nodes": len(main.nodes),
             "ops_gemm": (s.M * s.N * s.group * 2 * s.K) if s.M else None,
             "ops_detection": costs.get("detection"), "ops_expected_recovery": costs.get("recovery"),
             "p_gemm_faulty": costs.get("p_faulty")}
    return entry, main, nb, raw, fixed, count, cond


def _depthwise_sums(main: Nodes, w: str, chan, tau: float) -> tuple[str, str]:
    """A depthwise Conv's channel "sums" (one channel per group: the scaled filter itself) as
    main-graph nodes on its weight ``w``, which onnxruntime constant-folds at load, so the file
    holds no second and third copy of the filter. The arithmetic is numpy's for the other convs,
    in float64 and rounded once to float32, so the values are bit for bit those it would store:
    ``Wsum = float32(W chan)``, ``AbsWsum = float32(tau |W chan|)`` (``chan``: the absorbed
    per-channel scales, or 1)."""
    w64 = main.op("Cast", w, to=TensorProto.DOUBLE)
    if not np.all(np.asarray(chan) == 1.0):
        w64 = main.op("Mul", w64, main.const(np.asarray(chan, np.float64), hint="chan"))
    # (a folded tensor of its own even when it equals W: a check Conv(X, W) reading the model's own
    # weight could be merged with the model's Conv by common-subexpression elimination)
    ws = main.op("Cast", w64, to=TensorProto.FLOAT)
    wabs = main.op("Cast", main.op("Mul", main.op("Abs", w64), main.const(np.float64(tau), hint="tau")),
                   to=TensorProto.FLOAT)
    return ws, wabs


def conv_cost(M: int, N: int, K: int, ber: float, bits: int = 32) -> dict:
    """Expected operations per item: the test (two single-channel convolutions, 2 x 2MK; the
    channel sums, MN; compare, 3M) always; the item recomputed (2MNK) when it is faulty."""
    p = p_faulty(M * N * 2 * K, ber, bits)
    det = 4 * M * K + M * N + 3 * M
    rec = p * 2 * M * N * K
    return {"detection": det, "recovery": rec, "total": det + rec, "p_faulty": p}
