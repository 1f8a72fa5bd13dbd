"""ABFT inside ``If`` branches and ``Loop``/``Scan`` bodies.

``passes.abft`` rewrites one graph: the main graph of a model. Exporters put whole networks inside
control flow (Silero VAD: every layer sits in an ``If`` on the sample rate), so ``abft_nested``
applies the same rewrite to every body, at any depth:

1. the body becomes a model of its own: its inputs (a Loop's iteration count, condition and
   carried values; none for an ``If`` branch) followed by every outer-scope tensor it reads, typed
   from shape inference of the enclosing graph; its outputs and initializers are the body's;
2. ``abft`` (recursively ``abft_nested``, for bodies inside bodies) protects that model;
3. the result goes back as the body: the outer-scope tensors are inputs no longer (they are read
   from the enclosing scope again, by name, as before), and every name the protection made is
   prefixed with the body's own tag (``onnxft.abft.s0.``, ``s1.``...) so that no name repeats
   across scopes.

The enclosing graph is not touched, and a body's outputs keep their names and count, so the
control-flow node's interface is unchanged. Plan entries of nested GEMMs/Convs carry ``"graph"``,
the path of their body (``If_0.then_branch``). Calibrated thresholds, explicit block sizes and
``gemms`` lists name main-graph GEMMs only: nested ones get the rounding bound and Algorithm 2's
block size at the body's static (or representative) dimensions.
"""
from __future__ import annotations

import onnx
from onnx import helper, shape_inference

from ..graph.edit import walk
from ..graph.roles import PROTECTION, role_of
from .abft import AbftError, abft
from .result import PassResult

PREFIX = "onnxft.abft."
_SUBGRAPH_REASON = "subgraphs are not protected"
_OPS = ("MatMul", "Gemm", "Conv")


def _bodies(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        for k, g in enumerate(a.graphs):
            yield f"{a.name}{k}", g


def _has_gemm(graph: onnx.GraphProto) -> bool:
    return any(n.op_type in _OPS and n.domain in ("", "ai.onnx") for _, n in walk(graph))


def captured(body: onnx.GraphProto) -> list[str]:
    """Outer-scope tensors ``body`` reads (at any depth), in order of first use."""
    defined = {i.name for i in body.input} | {t.name for t in body.initializer}
    defined |= {o for _, n in walk(body) for o in n.output if o}
    for _, n in walk(body):  # nested bodies' own inputs and initializers are theirs
        for _, sub in _bodies(n):
            defined |= {i.name for i in sub.input} | {t.name for t in sub.initializer}
    out = []
    for _, n in walk(body):
        for i in n.input:
            if i and i not in defined and i not in out:
                out.append(i)
    for o in body.output:  # a branch may return an outer tensor as is
        if o.name not in defined and o.name not in out:
            out.append(o.name)
    return out


def scope_types(model: onnx.ModelProto) -> dict:
    """Tensor name -> ValueInfoProto for every typed tensor of the model's main graph."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
    for t in g.initializer:
        types.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for n in g.node:  # Constant nodes' outputs: typed from the value
        if n.op_type == "Constant" and n.output[0] not in types and n.attribute and n.attribute[0].type == \
                onnx.AttributeProto.TENSOR:
            t = n.attribute[0].t
            types[n.output[0]] = helper.make_tensor_value_info(n.output[0], t.data_type, list(t.dims))
    return types


def outer_constants(model: onnx.ModelProto) -> dict:
    """Tensor name -> TensorProto of the main graph's initializers and Constant nodes."""
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            consts[n.output[0]] = t
    return consts


def body_as_model(body: onnx.GraphProto, types: dict, like: onnx.ModelProto,
                  consts: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """``(model, outer-scope names)``: ``body`` as a standalone model whose extra inputs are the
    outer-scope tensors it reads (typed from ``types``); those in ``consts`` (the enclosing
    graph's weights) become its initializers, so that the rewrite sees constant weights."""
    consts = consts or {}
    outer = captured(body)
    missing = [t for t in outer if t not in types and t not in consts]
    if missing:
        raise AbftError(f"outer-scope tensor {missing[0]!r} has no known type")
    inputs = list(body.input) + [types[t] for t in outer if t not in consts]
    graph = helper.make_graph(list(body.node), body.name or "body", inputs, list(body.output),
                              initializer=list(body.initializer) + [consts[t] for t in outer if t in consts],
                              value_info=list(body.value_info))
    model = helper.make_model(graph, opset_imports=list(like.opset_import), ir_version=like.ir_version)
    model.functions.extend(like.functions)
    return model, outer


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Prefix ``old`` -> ``new`` in every name the protection made (nodes, tensors, metadata), at any depth."""
    def fix(s: str) -> str:
        return new + s[len(old):] if s.startswith(old) else s

    for t in graph.initializer:
        t.name = fix(t.name)
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        v.name = fix(v.name)
    for n in graph.node:
        n.name = fix(n.name)
        for k, x in enumerate(n.input):
            n.input[k] = fix(x)
        for k, x in enumerate(n.output):
            n.output[k] = fix(x)
        for p in n.metadata_props:  # recovery operands and recompute marks name tensors
            p.value = p.value.replace(old, new)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.name = fix(a.t.name)
        for _, sub in _bodies(n):
            _rename(sub, old, new)


def _as_body(protected: onnx.ModelProto, body: onnx.GraphProto, outer: list[str], tag: str) -> onnx.GraphProto:
    g = onnx.GraphProto()
    g.CopyFrom(protected.graph)
    _rename(g, PREFIX, f"{PREFIX}{tag}.")
    gone = set(outer)  # read from the enclosing scope again (weights included: never copied)
    keep = [i for i in g.input if i.name not in gone]
    del g.input[:]
    g.input.extend(keep)
    inits = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(inits)
    if [o.name for o in g.output] != [o.name for o in body.output]:
        raise AbftError("the protected body's outputs changed")
    g.name = body.name
    return g


def abft_nested(model: onnx.ModelProto, _tags: list | None = None, **options) -> PassResult:
    """``passes.abft.abft(model, **options)``, then the same rewrite in every ``If``/``Loop``/
    ``Scan`` body (see the module docstring). Same ``PassResult``; ``details["gemms"]`` and
    ``["convs"]`` include the nested entries, each with its ``"graph"`` path."""
    tags = _tags if _tags is not None else [0]
    res = abft(model, **options)
    out = res.model
    skipped = [s for s in res.skipped if not str(s[1]).endswith(_SUBGRAPH_REASON)]
    nested_opts = {k: v for k, v in options.items() if k not in ("thresholds", "gemms", "shapes", "expose_flags")}
    if isinstance(nested_opts.get("block_size"), dict):
        nested_opts["block_size"] = "auto"
    if isinstance(nested_opts.get("impl"), dict):  # per-GEMM choices name main-graph GEMMs only
        nested_opts["impl"] = "global"
    types = consts = None
    gemms, convs = list(res.details.get("gemms", [])), list(res.details.get("convs", []))
    inserted = list(res.inserted)
    for node in out.graph.node:
        if role_of(node) == PROTECTION:
            continue
        for attr, body in _bodies(node):
            if not _has_gemm(body):
                continue
            path = f"{node.name or node.output[0]}.{attr}"
            if types is None:
                types, consts = scope_types(model), outer_constants(model)
            try:
                sub, outer = body_as_model(body, types, model, consts)
                r = abft_nested(sub, tags, **nested_opts)
                tag = f"s{tags[0]}"
                tags[0] += 1
                new_body = _as_body(r.model, body, outer, tag)
            except AbftError as exc:
                for _, n in walk(body):
                    if n.op_type in _OPS:
                        skipped.append((n.name or n.output[0], f"inside {path}: {exc}"))
                continue
            body.CopyFrom(new_body)
            skipped += [(name, f"inside {path}: {why}") for name, why in r.skipped]
            inserted += [f"{path}: {x}" for x in r.inserted]
            for key, found in (("gemms", gemms), ("convs", convs)):
                for e in r.details.get(key, []):
                    e = dict(e)
                    e["graph"] = f"{path}/{e['graph']}" if e.get("graph") else path
                    found.append(e)
    details = dict(res.details)
    details.update(gemms=gemms, convs=convs)
    return PassResult(model=out, inserted=inserted, skipped=skipped, details=details)
