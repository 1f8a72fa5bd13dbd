"""TMR pass: triplicate a region of the graph (e.g. one transformer block) and vote on what leaves it.

What it inserts, and why: the selected nodes are copied twice (tensors renamed ``<name>/tmr1`` and
``<name>/tmr2``); every tensor the region produces and the rest of the graph reads (or a graph
output) then goes through a voter of its three versions. The copies are the model's own
computation done again, so they are fault sites like the originals (a fault hits one copy); the
voters are protection nodes (role ``protection``).

The voter is the elementwise median of the three copies, with NaN read as +Inf (onnxruntime's
Min/Max propagate NaN): fault-free the copies agree exactly and the median returns them unchanged;
one faulty copy is outvoted; and when every copy carries some small error (at high BER each copy
of a large layer is hit somewhere, and attention spreads a fault over many elements) the median
still keeps the value between two slightly-off ones, where a bitwise majority vote would find no
two equal copies and pass a faulty one through.

This is the layer-wise TMR baseline of the seed paper's Figs. 11 and 12 (refs [34], [58]).
"""
from __future__ import annotations

import copy
import re
from typing import Iterable

import onnx
from onnx import helper

from ..graph.roles import PROTECTION, set_role
from .result import PassResult

COPIES = ("tmr1", "tmr2")


def tmr(model: onnx.ModelProto, nodes: Iterable[str] | str) -> PassResult:
    """Triplicate the nodes named in ``nodes`` (names, or one regex on node names) and vote.

    Returns a new model; ``details`` holds the region's node count and the voted tensors."""
    m = copy.deepcopy(model)
    g = m.graph
    if isinstance(nodes, str):
        pattern = re.compile(nodes)
        chosen = {n.name for n in g.node if n.name and pattern.search(n.name)}
    else:
        chosen = set(nodes)
    region = [n for n in g.node if n.name in chosen]
    result = PassResult(model=m)
    if not region:
        result.skipped.append((str(nodes), "no node matches"))
        return result
    produced = {o for n in region for o in n.output if o}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    readers_outside = {i for n in g.node if n.name not in chosen for i in n.input}
    graph_outputs = {o.name for o in g.output}
    leaving = [t for n in region for t in n.output if t and (t in readers_outside or t in graph_outputs)]

    def renamed(node, tag):
        c = copy.deepcopy(node)
        c.name = f"{node.name}/{tag}"
        c.input[:] = [f"{i}/{tag}" if i in produced else i for i in c.input]
        c.output[:] = [f"{o}/{tag}" if o else o for o in c.output]
        return c

    # The original region keeps computing the names it had; its leaving tensors get a /tmr0 name and
    # the vote writes the original name, so the rest of the graph is untouched.
    voted = {t: f"{t}/tmr0" for t in leaving}
    new_nodes = []
    for n in g.node:
        if n.name not in chosen:
            new_nodes.append(n)
            continue
        orig = copy.deepcopy(n)
        orig.output[:] = [voted.get(o, o) for o in orig.output]
        orig.input[:] = [voted.get(i, i) if i in voted else i for i in orig.input]
        new_nodes.append(orig)
        if n is region[-1]:
            for tag in COPIES:
                new_nodes.extend(renamed(r, tag) for r in region)
            for t in leaving:
                new_nodes.extend(_voter(voted[t], f"{t}/tmr1", f"{t}/tmr2", t, types.get(t, onnx.TensorProto.FLOAT)))
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | {t.name for t in g.initializer}))
    # value_info of renamed tensors is stale; shape inference restores what it can
    kept = [v for v in g.value_info if v.name not in voted]
    del g.value_info[:]
    g.value_info.extend(kept)
    result.inserted.append(f"TMR over {len(region)} nodes, {len(leaving)} voted tensors")
    result.details = {"nodes": [n.name for n in region], "voted": leaving}
    return result


def _majority(a: str, b: str, c: str, out: str) -> list[onnx.NodeProto]:
    """Bitwise majority ``Where(a == b, a, Where(a == c, a, b))``, for integer and bool tensors."""
    ab, ac, inner = f"{out}/vote_ab", f"{out}/vote_ac", f"{out}/vote_inner"
    nodes = [helper.make_node("Equal", [a, b], [ab], name=f"{out}/vote/eq_ab"),
             helper.make_node("Equal", [a, c], [ac], name=f"{out}/vote/eq_ac"),
             helper.make_node("Where", [ac, a, b], [inner], name=f"{out}/vote/where_ac"),
             helper.make_node("Where", [ab, a, inner], [out], name=f"{out}/vote/where_ab")]
    for n in nodes:
        set_role(n, PROTECTION)
    return nodes


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _voter(a: str, b: str, c: str, out: str, elem: int = onnx.TensorProto.FLOAT) -> list[onnx.NodeProto]:
    """Elementwise median of three tensors, NaN counted as +Inf (see the module docstring)."""
    if elem not in _FLOATS:
        return _majority(a, b, c, out)
    nodes, clean = [], []
    for k, x in enumerate((a, b, c)):
        nan, inf, y = f"{out}/vote_nan{k}", f"{out}/vote_inf", f"{out}/vote_in{k}"
        nodes.append(helper.make_node("IsNaN", [x], [nan], name=f"{out}/vote/isnan{k}"))
        nodes.append(helper.make_node("Where", [nan, inf, x], [y], name=f"{out}/vote/where{k}"))
        clean.append(y)
    x, y, z = clean
    lo, hi, mid = f"{out}/vote_lo", f"{out}/vote_hi", f"{out}/vote_mid"
    nodes.insert(0, helper.make_node("Constant", [], [f"{out}/vote_inf"], name=f"{out}/vote/inf",
                                     value=helper.make_tensor("inf", elem, [], [float("inf")])))
    nodes += [helper.make_node("Min", [x, y], [lo], name=f"{out}/vote/min_ab"),
              helper.make_node("Max", [x, y], [hi], name=f"{out}/vote/max_ab"),
              helper.make_node("Min", [hi, z], [mid], name=f"{out}/vote/min_hi_c"),
              helper.make_node("Max", [lo, mid], [out], name=f"{out}/vote/median")]
    for n in nodes:
        set_role(n, PROTECTION)
    return nodes


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable topological order (a region need not be contiguous in the node list)."""
    producers = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []

    def visit(k: int, stack: set[int]):
        if k in done:
            return
        stack.add(k)
        for i in _reads(nodes[k]):
            p = producers.get(i)
            if p is not None and p not in done and p not in stack and i not in available:
                visit(p, stack)
        stack.discard(k)
        done.add(k)
        order.append(nodes[k])

    for k in range(len(nodes)):
        visit(k, set())
    return order


def _reads(node: onnx.NodeProto):
    """Inputs of a node, with the outer-scope names its subgraphs read."""
    yield from (i for i in node.input if i)
    for a in node.attribute:
        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in subs:
            inner = {o for n in sub.node for o in n.output} | {t.name for t in sub.initializer}
            for n in sub.node:
                yield from (i for i in _reads(n) if i not in inner)
