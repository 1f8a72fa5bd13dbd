"""Which nodes compute only from constants: arithmetic a runtime does once, at model load.

An int8 export that dequantises its weights inside the graph (``Cast`` + ``Mul`` by the scale), a
weight reshaped or transposed by a node, a scale computed from two constants: every input of such a
node is fixed when the model is loaded, so onnxruntime's constant folding computes it once in
``InferenceSession`` and no inference runs it again. A fault in that arithmetic is a corrupted
weight (a memory fault), not a per-inference arithmetic fault, so ``inject`` does not make these
nodes operation-wise fault sites (``SiteSelection.fault_constants``; docs/fault_model.md).

A graph walk, no values: cheap on any model, whatever the size of its weights.
"""
from __future__ import annotations

import onnx

from .edit import DEFAULT_DOMAINS

# Their outputs change from run to run although their inputs do not: never folded.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli"})
# onnxruntime leaves DequantizeLinear of a constant unfolded (its QDQ fusions turn it and the op it
# feeds into an integer kernel): checked on 1.31.1, DequantizeLinear(int8 weight) -> Mul -> MatMul
# keeps DequantizeLinear and Mul at level basic. So what reads it runs per inference.
NOT_FOLDED = NONDETERMINISTIC | {"DequantizeLinear"}


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of the main-graph tensors whose values are fixed at load: initializers that no graph
    input of the same name can override (a graph input can be fed, whatever its default), and the
    outputs of every default-domain, deterministic node without subgraphs, other than
    ``DequantizeLinear``, whose inputs are all such tensors (``Constant`` has none;
    ``ConstantOfShape`` of a constant shape qualifies). Nodes are read in the graph's order, which
    ONNX requires to be topological."""
    fed = {i.name for i in graph.input}
    const = {t.name for t in graph.initializer if t.name not in fed}
    const |= {t.values.name for t in graph.sparse_initializer if t.values.name not in fed}
    for n in graph.node:
        if n.domain not in DEFAULT_DOMAINS or n.op_type in NOT_FOLDED or _has_subgraphs(n):
            continue
        if all(not i or i in const for i in n.input):
            const.update(o for o in n.output if o)
    return const


def load_time_nodes(graph: onnx.GraphProto) -> set[str]:
    """First output names of the main-graph nodes that compute only from constants (see
    ``constant_tensors``): a runtime folds them at load, so they do not run per inference."""
    const = constant_tensors(graph)
    return {n.output[0] for n in graph.node if n.output and n.output[0] in const}


def _has_subgraphs(node: onnx.NodeProto) -> bool:
    # an If/Loop/Scan body may read non-constant tensors of the outer scope
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
