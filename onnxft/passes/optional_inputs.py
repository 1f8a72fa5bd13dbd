"""Fault tables as optional graph inputs, for an injection graph that plain onnxruntime runs.

``inject`` gives every fault table (``onnxft.<site>.faults``, the conv offsets, ``onnxft.probe``) an
empty initializer of the same name, so that the graph runs fault-free when it is not fed. ONNX
Runtime logs a warning for every initializer that is also a graph input (264 lines for the sample
ViT), and its log level is the user's session setting, not the model's. An input of *optional*
type that is not fed is None in onnxruntime, without a warning; this pass turns each such input
into one, read through ``If(OptionalHasElement(t), OptionalGetElement(t), <the empty default>)``.
The names, and so ``fault_feeds``' .npz, stay the same.

One If per input costs about 4.5 us per run on CPU (264 inputs: 1.2 ms, docs/fault_model.md), so
campaigns, which set onnxruntime's log level themselves, run the graph without this pass; ``onnxft
inject`` applies it to the graph it writes.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ..graph.edit import walk
from .result import PassResult

PREFIX = "onnxft."


def optional_fault_inputs(model: onnx.ModelProto) -> PassResult:
    """A copy of the injection graph ``model`` whose ``onnxft.*`` inputs with an initializer default
    are optional-typed inputs defaulting to that initializer (see the module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    defaults = {t.name: t for t in g.initializer if t.name.startswith(PREFIX)}
    targets = [vi for vi in g.input if vi.name in defaults]
    result = PassResult(m)
    if not targets:
        return result
    rename = {vi.name: f"{vi.name}/value" for vi in targets}
    for _, node in walk(g):  # every reader, at any depth, reads the If's result instead
        node.input[:] = [rename.get(i, i) for i in node.input]
    readers = []
    for vi in targets:
        name, value = vi.name, rename[vi.name]
        tensor_type = onnx.TypeProto()
        tensor_type.CopyFrom(vi.type)
        then_out, else_out = onnx.ValueInfoProto(), onnx.ValueInfoProto()
        then_out.name, else_out.name = f"{value}/given", f"{value}/default"
        then_out.type.CopyFrom(tensor_type)
        else_out.type.CopyFrom(tensor_type)
        then_g = helper.make_graph([helper.make_node("OptionalGetElement", [name], [then_out.name])],
                                   f"{name}/given", [], [then_out])
        else_g = helper.make_graph([helper.make_node("Constant", [], [else_out.name], value=defaults[name])],
                                   f"{name}/default", [], [else_out])
        readers += [helper.make_node("OptionalHasElement", [name], [f"{name}/fed"], name=f"{name}/fed"),
                    helper.make_node("If", [f"{name}/fed"], [value], name=f"{name}/read",
                                     then_branch=then_g, else_branch=else_g)]
        vi.type.CopyFrom(helper.make_optional_type_proto(tensor_type))
        result.inserted.append(f"{name}: optional input")
    kept = [t for t in g.initializer if t.name not in rename]
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = readers + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return result
