"""How much of a model's GEMM and Conv arithmetic a hardened graph protects, in multiply-accumulates.

``gemm_conv_macs`` measures every main-graph MatMul, Gemm and Conv on one fault-free batch (the
shapes of the real run, so dynamic axes count at their real sizes), those of the ``If`` branches
the run takes, the gate products of LSTM/GRU/RNN operators (GEMM work the injector faults; checked
only once ``harden --recurrent`` decomposed them) and ConvTranspose (no check yet: unprotected);
``coverage`` splits the total
by the scheme that protects each node (``lb``, ``standard``, ``sec``, ``recompute`` for Convs,
``none``) and lists every unprotected node with its reason. ``harden`` stores the result in the
plan and in the hardened model's metadata (``COVERAGE_KEY``), where ``onnxft inspect`` reads it.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from ..graph.edit import walk, with_outputs
from ..runtime.session import make_session

COVERAGE_KEY = "onnxft.coverage"
_OPS = ("MatMul", "Gemm", "Conv")
# Recurrent operators: their gate products are GEMMs the injector faults (inject decomposes them);
# ABFT does not check them yet, so they count as unprotected GEMM work. Gates per hidden unit:
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# GEMM work ABFT has no check for yet, counted so the coverage says so (a saliency or
# segmentation decoder's upsampling is mostly ConvTranspose)
_UNCHECKED = ("ConvTranspose",)
_MEASURED = _OPS + tuple(_RECURRENT_GATES) + _UNCHECKED


def _node_name(node) -> str:
    return node.name or node.output[0]


def _bodies(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        for k, g in enumerate(a.graphs):
            yield f"{a.name}{k}", g


def _subgraph_nodes(graph, prefix: str = ""):
    """``(path, node)`` of every GEMM/Conv inside the bodies of ``graph``'s nodes, at any depth;
    ``path`` as ``abft_nested`` writes it (``If_0.then_branch``)."""
    for node in graph.node:
        for attr, body in _bodies(node):
            path = f"{prefix}{_node_name(node)}.{attr}"
            for n in body.node:
                if n.op_type in _MEASURED:
                    yield path, n
            yield from _subgraph_nodes(body, path + "/")


def gemm_conv_macs(model: onnx.ModelProto, feeds: dict, items: int | None = None,
                   prefix: str = "") -> tuple[dict, list]:
    """``({node name: (op_type, MACs per item)}, [GEMM/Conv nodes inside bodies not measured])``
    from one run of ``model`` on ``feeds`` (items = the first input's leading dimension). GEMMs and
    Convs of the ``If`` branch the run takes are measured too (the branch run as a model of its own
    on the outer-scope values it reads), named ``path/name`` (``If_0.then_branch/Conv_3``); those
    in the branch not taken and in ``Loop``/``Scan`` bodies are listed as not measured."""
    from ..passes.abft_nested import body_as_model, outer_constants

    nodes = [n for n in model.graph.node if n.op_type in _MEASURED and n.domain in ("", "ai.onnx")]
    branches = []  # (If node, attr, body) of main-graph Ifs holding GEMM/Conv
    for n in model.graph.node:
        if n.op_type == "If":
            for attr, body in _bodies(n):
                if any(x.op_type in _MEASURED for _, x in walk(body)):
                    branches.append((n, attr, body))
    wanted = []
    for n in nodes:
        for t in (n.input[0], n.input[1], n.input[2] if n.op_type in _RECURRENT_GATES else n.output[0]):
            if t not in wanted:
                wanted.append(t)
    for n, _, _ in branches:
        if n.input[0] not in wanted:
            wanted.append(n.input[0])
    inits = {t.name: t for t in model.graph.initializer}
    fetch = [t for t in wanted if t not in inits and t not in feeds]
    probe = with_outputs(model, fetch)
    sess = make_session(probe, "cpu", level="disabled")
    values = dict(zip(fetch, sess.run(fetch, feeds))) if fetch else {}
    values.update({t: v for t, v in feeds.items() if t in wanted})
    shapes = {t: tuple(np.shape(v)) for t, v in values.items()}
    shapes.update({t: tuple(inits[t].dims) for t in wanted if t in inits})
    if items is None:
        first = next(iter(feeds.values()))
        items = max(1, int(np.shape(first)[0]) if np.ndim(first) else 1)
    out = {}
    for n in nodes:
        if n.op_type in _RECURRENT_GATES:  # X [seq, batch, I] (or batch-first), W [dirs, G*H, I], R [dirs, G*H, H]
            x, w, r = shapes[n.input[0]], shapes[n.input[1]], shapes[n.input[2]]
            out[prefix + _node_name(n)] = (n.op_type, int(x[0]) * int(x[1]) * int(w[0]) * int(w[1]) *
                                           (int(w[2]) + int(r[2])) / items)
            continue
        a, b, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "ConvTranspose":  # every input element times its W[ci] slice: Cout/group x kernel
            out[prefix + _node_name(n)] = (n.op_type, int(np.prod(a, dtype=np.int64)) * int(np.prod(b[1:])) / items)
            continue
        if n.op_type == "Conv":
            k = int(np.prod(b[1:]))
        elif n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        out[prefix + _node_name(n)] = (n.op_type, int(np.prod(y, dtype=np.int64)) * int(k) / items)
    for n, attr, body in branches:
        cond = values.get(n.input[0])
        if cond is None or bool(np.asarray(cond).reshape(-1)[0]) != (attr == "then_branch"):
            continue
        path = f"{prefix}{_node_name(n)}.{attr}"
        try:
            sub, outer = body_as_model(body, _value_types(model, values, feeds), model, outer_constants(model))
            wanted_in = {i.name for i in sub.graph.input}
            sub_feeds = {k: v for k, v in _outer_values(model, outer, values, feeds).items() if k in wanted_in}
            inner, _ = gemm_conv_macs(sub, sub_feeds, items, path + "/")
        except Exception:  # an unusual branch: listed as not measured rather than failing harden
            continue
        out.update(inner)
    nested = [f"{prefix}{p}/{_node_name(x)}" for p, x in _subgraph_nodes(model.graph)
              if f"{prefix}{p}/{_node_name(x)}" not in out]
    return out, nested


def _value_types(model, values: dict, feeds: dict) -> dict:
    from ..passes.abft_nested import scope_types

    types = scope_types(model)
    for t, v in list(values.items()) + list(feeds.items()):  # the run's own dtypes and shapes win
        v = np.asarray(v)
        types[t] = onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
    return types


def _outer_values(model, outer: list, values: dict, feeds: dict) -> dict:
    """Values of the outer-scope tensors a branch reads, from one more run of the main graph."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    got = {t: values[t] for t in outer if t in values}
    got.update({t: numpy_helper.to_array(inits[t]) for t in outer if t in inits and t not in got})
    missing = [t for t in outer if t not in got]
    if missing:
        probe = with_outputs(model, missing)
        got.update(zip(missing, make_session(probe, "cpu", level="disabled").run(missing, feeds)))
    return got


def coverage(macs: dict, in_subgraphs: list, gemms: list[dict], convs: list[dict], skipped: list) -> dict:
    """``{"macs", "by_scheme": {scheme: MACs}, "fraction": {scheme: share}, "unprotected": [...]}``
    from the measured MACs and the ABFT plan entries (``gemms``, ``convs``; a nested entry is keyed
    ``graph/name``) and skip reasons."""
    key = lambda e: f"{e['graph']}/{e['name']}" if e.get("graph") else e["name"]  # noqa: E731
    scheme = {key(g): g["scheme"] for g in gemms}
    scheme.update({key(c): c["scheme"] for c in convs})
    reasons = {str(s[0]): str(s[1]) for s in skipped}
    by = {"lb": 0.0, "standard": 0.0, "recompute": 0.0, "none": 0.0}
    unprotected = []
    for name, (op_type, m) in macs.items():
        sch = scheme.get(name, "none")
        by[sch] = by.get(sch, 0.0) + m
        if sch == "none":
            why = ("recurrent operator: its gate products are checked only with --recurrent (decomposed)"
                   if op_type in _RECURRENT_GATES else
                   "ConvTranspose: not protected yet (GEMM work without an ABFT check)" if op_type in _UNCHECKED
                   else "not selected for protection")
            unprotected.append({"name": name, "op_type": op_type, "macs": m,
                                "reason": reasons.get(name, reasons.get(name.rsplit("/", 1)[-1], why))})
    not_measured = []
    for name in in_subgraphs:
        if name in scheme:
            not_measured.append({"name": name, "scheme": scheme[name]})
        else:
            unprotected.append({"name": name, "op_type": "", "macs": None,
                                "reason": reasons.get(name.rsplit("/", 1)[-1], "not protected") +
                                "; inside a Loop/Scan body or an If branch not taken: not measured"})
    total = float(sum(m for _, m in macs.values()))
    unprotected.sort(key=lambda u: -(u["macs"] or 0))
    out = {"macs": total, "by_scheme": by,
           "fraction": {k: (v / total if total else 0.0) for k, v in by.items()},
           "unprotected": unprotected}
    if not_measured:
        out["protected_not_measured"] = not_measured
    return out


def coverage_line(cov: dict) -> str:
    """One line: protected share of GEMM+Conv MACs per item, by scheme."""
    if not cov or not cov.get("macs"):
        return "coverage: no GEMM or Conv multiply-accumulates measured"
    f = cov["fraction"]
    protected = 1.0 - f.get("none", 0.0)
    parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in f.items() if v or k in ("lb", "none"))
    n_un = sum(1 for u in cov["unprotected"])
    return (f"coverage: {100 * protected:.1f}% of {cov['macs']:,.0f} GEMM+Conv MACs per item protected ({parts}); "
            f"{n_un} GEMM/Conv unprotected")


def store(model: onnx.ModelProto, cov: dict) -> None:
    """Record ``cov`` in the model's metadata (``onnxft inspect`` reads it back)."""
    for p in model.metadata_props:
        if p.key == COVERAGE_KEY:
            p.value = json.dumps(cov)
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=COVERAGE_KEY, value=json.dumps(cov)))


def stored(model: onnx.ModelProto) -> dict | None:
    return next((json.loads(p.value) for p in model.metadata_props if p.key == COVERAGE_KEY), None)
