"""Small graph-editing helpers shared by the passes."""
from __future__ import annotations

from typing import Iterator

import onnx


DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto, missing=None):
    """The model's default-domain (ONNX) opset version, or ``missing`` when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), missing)


def walk(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto]]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies, nested), with the graph
    that holds it, in order."""
    for n in graph.node:
        yield graph, n
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from walk(sub)


def producer_index(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> position of the node that produces it (the keys ``insert_after`` takes)."""
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def insert_after(graph: onnx.GraphProto, after: dict[int, list]) -> None:
    """Splice new nodes into ``graph``: ``after[i]`` goes right after the node at position ``i``
    (positions before any insertion), so every inserted check sits next to the tensor it reads and
    the graph stays topologically sorted. (Positions, not ``id(node)``: protobuf may hand out a new
    Python wrapper for the same node on every access.)"""
    new_nodes = []
    for i, n in enumerate(graph.node):
        new_nodes.append(n)
        new_nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)


def with_outputs(model: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (to read intermediate values in a session).

    Each added output carries the type shape inference (or the model's own value_info) gives it, and
    no type at all where neither knows: onnxruntime accepts an untyped output, while a guessed one
    (float where the graph computes float16) makes it refuse the model."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # custom ops, >2 GB: what the model declares
        g = model.graph
    known = {v.name: v for v in [*g.input, *g.value_info]}
    for t in tensors:
        if t not in have:
            vi = onnx.ValueInfoProto()
            if t in known:
                vi.CopyFrom(known[t])
            else:
                vi.name = t
            m.graph.output.append(vi)
            have.add(t)
    return m
