"""Why a node is not a fault site: every node of an injection graph's model that no site covers,
with one reason each, for ``onnxft inspect`` and for the "no fault sites" error.

Reasons come from three places: what the inject pass decided about a candidate it looked at
(``reasons`` by output name: integer arithmetic, arithmetic on constants only, not selected,
protection; ``skipped``: the
problems it reported), where the node sits (inside an If/Loop/Scan body), and otherwise the op
type's nature (data movement, comparison, quantization...)."""
from __future__ import annotations

from collections import Counter

import onnx

from ..ops.registry import handler_for

DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Scatter",
    "ScatterElements", "ScatterND", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Tile", "Pad",
    "Shape", "Size", "Cast", "CastLike", "Constant", "ConstantOfShape", "DepthToSpace", "SpaceToDepth",
    "NonZero", "Range", "OneHot", "Compress", "ReverseSequence", "Trilu", "EyeLike", "SequenceAt",
    "SequenceConstruct", "SequenceInsert", "SplitToSequence", "ConcatFromSequence", "Optional",
    "OptionalGetElement", "OptionalHasElement", "Dropout", "BitCast",
})
COMPARISON = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Not", "Xor",
                        "IsNaN", "IsInf", "Where", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"})
SELECTION = frozenset({"Relu", "Clip", "Max", "Min", "MaxPool", "GlobalMaxPool", "Abs", "Neg", "Sign", "Floor",
                       "Ceil", "Round", "ArgMax", "ArgMin", "TopK", "NonMaxSuppression"})
QUANTIZATION = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_BODY = {"If": "an If branch", "Loop": "a Loop body", "Scan": "a Scan body"}

NOT_SELECTED = "not selected (--sites / --op-types / --format)"
INTEGER = "integer arithmetic (shape or index computation)"
PROTECTION = "inserted by harden (a site only with --inject-protection)"
CONSTANT = "constant arithmetic (folded at load: runs once, not per inference; --fault-constants to fault it)"


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _nature(node: onnx.NodeProto) -> str:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op ({node.domain})"
    if op in DATA_MOVEMENT:
        return "data movement"
    if op in COMPARISON:
        return "comparison or logic (no arithmetic result)"
    if op in SELECTION:
        return "selection or sign (max/min/clamp/abs: no rounded arithmetic result)"
    if op in QUANTIZATION:
        return "quantization (the integer arithmetic it feeds is the site)"
    if op in _BODY:
        return "control flow (the nodes of its body are listed on their own)"
    return f"{op} is not a fault site yet (no handler)"


def non_sites(graph: onnx.GraphProto, covered: set[str], reasons: dict[str, str],
              skipped: list[tuple[str, str]]) -> list[dict]:
    """One ``{"node", "op_type", "reason"}`` per node of ``graph`` (and of its subgraphs) that no
    site covers. ``covered``: output names of the nodes that are sites (or that a site wraps)."""
    said = dict(skipped)
    out = []

    def visit(g: onnx.GraphProto, inside: str | None):
        for n in g.node:
            first = n.output[0] if n.output else ""
            if first in covered:
                continue
            label = _label(n)
            if first in reasons:
                reason = reasons[first]
            elif label in said or f"{n.op_type}({first})" in said:  # (decompose names unnamed nodes so)
                reason = said.get(label) or said[f"{n.op_type}({first})"]
            elif handler_for(n.op_type) is not None and n.domain in ("", "ai.onnx"):
                reason = "not a site (see the inject pass)"
            else:
                reason = _nature(n)
            if inside is not None:
                reason += f" (inside {inside})"
            out.append({"node": label, "op_type": n.op_type, "reason": reason})
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    visit(sub, inside or _BODY.get(n.op_type, f"a subgraph of {n.op_type}"))

    visit(graph, None)
    return out


def why_no_sites(rows: list[dict]) -> str:
    """The one-line reason behind "no fault sites" for the non-site rows of a model."""
    if not rows:
        return "no fault sites: the model has no nodes"
    counts = Counter(r["reason"] for r in rows)
    filtered = counts.pop(NOT_SELECTED, 0)
    constant = counts.pop(CONSTANT, 0)
    top = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(3))
    folded = (f"{constant} arithmetic node(s) compute only from constants (folded at load, not per inference; "
              f"--fault-constants makes them sites)")
    others = f"; other nodes: {top}" if top else ""
    if filtered:
        return (f"no fault sites match the selection: it filtered out all {filtered} candidate site(s) "
                f"(check --sites / --op-types / --format)" + (f"; {folded}" if constant else "") + others)
    if constant:
        return f"no fault sites: {folded}{others}"
    arithmetic = [r for r in rows if handler_for(r["op_type"]) is not None or r["op_type"] in ("Conv", "Gemm")]
    if not arithmetic:
        return f"no fault sites: the model has no arithmetic op that onnxft faults ({len(rows)} nodes: {top})"
    return f"no fault sites: ops are present but none is a site; top reasons: {top}"
