"""TMR pass: triplicate a region of the graph (e.g. one transformer block) and vote on what leaves it.

What it inserts, and why: the selected nodes are copied twice (tensors renamed ``<name>/tmr1`` and
``<name>/tmr2``); every tensor the region produces and the rest of the graph reads (or a graph
output) then goes through a voter of its three versions. The copies are the model's own
computation done again, so they are fault sites like the originals (a fault hits one copy); the
voters are protection nodes (role ``protection``).

The voter is a bitwise majority, ``Where(a == b, a, Where(a == c, a, b))``: the three copies run the
same kernels on the same inputs, so fault-free they agree exactly and the vote returns them
unchanged; a faulty copy (NaN included, since NaN equals nothing) is outvoted by the two that agree.
A median-of-three voter would also work but lets two different faulty values through the middle.

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
                new_nodes.extend(_voter(voted[t], f"{t}/tmr1", f"{t}/tmr2", t))
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | {t.name for t in g.initializer}))
    # value_info of renamed tensors is stale; shape inference restores what it can
    kept = [v for v in g.value_info if v.name not in voted]
    del g.value_info[:]
    g.value_info.extend(kept)
    result.inserted.append(f"TMR over {len(region)} nodes, {len(leaving)} voted tensors")
    result.details = {"nodes": [n.name for n in region], "voted": leaving}
    return result


def _voter(a: str, b: str, c: str, out: str) -> list[onnx.NodeProto]:
    """Bitwise majority of three tensors (see the module docstring)."""
    ab, ac, inner = f"{out}/vote_ab", f"{out}/vote_ac", f"{out}/vote_inner"
    nodes = [helper.make_node("Equal", [a, b], [ab], name=f"{out}/vote/eq_ab"),
             helper.make_node("Equal", [a, c], [ac], name=f"{out}/vote/eq_ac"),
             helper.make_node("Where", [ac, a, b], [inner], name=f"{out}/vote/where_ac"),
             helper.make_node("Where", [ab, a, inner], [out], name=f"{out}/vote/where_ab")]
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
