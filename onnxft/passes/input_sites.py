"""Input sites pass: put an ``Identity`` (role ``input``) after each float graph input, so that
the input's values become a fault site of their own (patch-wise vulnerability faults the image,
not the network).

The Identity reads the graph input and writes a new tensor; every consumer of the input is
rewired to it. inject treats a role-``input`` node as an elementwise site: one operation per
input element, whose result bits are the stored input value's bits.

Apply it to a model that ``passes.inject.prepare`` has already upgraded, then call ``inject(...,
prepared=True)``: onnx's version converter drops node metadata, and with it the role.
"""
from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper

from ..graph.roles import INPUT, set_role
from .result import PassResult

INPUT_SITE_PREFIX = "onnxft.input/"


def add_input_sites(model: onnx.ModelProto, names: list[str] | None = None) -> PassResult:
    """Return a copy of ``model`` with an input site after each float input (or those in ``names``)."""
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    result = PassResult(model=m)
    new_nodes = []
    for vi in g.input:
        if vi.name in inits or (names is not None and vi.name not in names):
            continue
        if vi.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            result.skipped.append((vi.name, "not a float input (ids and masks are not data values)"))
            continue
        out = f"{INPUT_SITE_PREFIX}{vi.name}"
        for node in list(g.node):
            node.input[:] = [out if i == vi.name else i for i in node.input]
            for a in node.attribute:  # subgraphs may read the input by name too
                if a.type == onnx.AttributeProto.GRAPH:
                    _rename_in_subgraph(a.g, vi.name, out)
        for o in g.output:
            if o.name == vi.name:
                result.skipped.append((vi.name, "the input is also a graph output"))
        node = set_role(helper.make_node("Identity", [vi.name], [out], name=f"{INPUT_SITE_PREFIX}{vi.name}"), INPUT)
        new_nodes.append(node)
        result.inserted.append(f"input site {out}")
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return result


def _rename_in_subgraph(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_in_subgraph(a.g, old, new)
