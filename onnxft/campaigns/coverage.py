"""How much of a model's GEMM and Conv arithmetic a hardened graph protects, in multiply-accumulates.

``gemm_conv_macs`` measures every main-graph MatMul, Gemm and Conv on one fault-free batch (the
shapes of the real run, so dynamic axes count at their real sizes); ``coverage`` splits the total
by the scheme that protects each node (``lb``, ``standard``, ``sec``, ``recompute`` for Convs,
``none``) and lists every unprotected node with its reason. ``harden`` stores the result in the
plan and in the hardened model's metadata (``COVERAGE_KEY``), where ``onnxft inspect`` reads it.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from ..graph.edit import with_outputs
from ..runtime.session import make_session

COVERAGE_KEY = "onnxft.coverage"
_OPS = ("MatMul", "Gemm", "Conv")


def _node_name(node) -> str:
    return node.name or node.output[0]


def _subgraph_nodes(graph, inside: bool = False):
    for node in graph.node:
        if inside and node.op_type in _OPS:
            yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _subgraph_nodes(a.g, True)
            for g in a.graphs:
                yield from _subgraph_nodes(g, True)


def gemm_conv_macs(model: onnx.ModelProto, feeds: dict) -> tuple[dict, list]:
    """``({node name: (op_type, MACs per item)}, [names of GEMM/Conv nodes inside subgraphs])``
    from one run of ``model`` on ``feeds`` (items = the first input's leading dimension)."""
    nodes = [n for n in model.graph.node if n.op_type in _OPS and n.domain in ("", "ai.onnx")]
    wanted = []
    for n in nodes:
        for t in (n.input[0], n.input[1], n.output[0]):
            if t not in wanted:
                wanted.append(t)
    inits = {t.name: t for t in model.graph.initializer}
    fetch = [t for t in wanted if t not in inits]
    probe = with_outputs(model, fetch)
    sess = make_session(probe, "cpu", level="disabled")
    shapes = {t: tuple(v.shape) for t, v in zip(fetch, sess.run(fetch, feeds))}
    shapes.update({t: tuple(inits[t].dims) for t in wanted if t in inits})
    items = max(1, int(np.shape(next(iter(feeds.values())))[0]) if np.ndim(next(iter(feeds.values()))) else 1)
    out = {}
    for n in nodes:
        a, b, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            k = int(np.prod(b[1:]))
        elif n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        out[_node_name(n)] = (n.op_type, int(np.prod(y, dtype=np.int64)) * int(k) / items)
    return out, [_node_name(n) for n in _subgraph_nodes(model.graph)]


def coverage(macs: dict, in_subgraphs: list, gemms: list[dict], convs: list[dict], skipped: list) -> dict:
    """``{"macs", "by_scheme": {scheme: MACs}, "fraction": {scheme: share}, "unprotected": [...]}``
    from the measured MACs and the ABFT plan entries (``gemms``, ``convs``) and skip reasons."""
    scheme = {g["name"]: g["scheme"] for g in gemms}
    scheme.update({c["name"]: c["scheme"] for c in convs})
    reasons = {str(s[0]): str(s[1]) for s in skipped}
    by = {"lb": 0.0, "standard": 0.0, "recompute": 0.0, "none": 0.0}
    unprotected = []
    for name, (op_type, m) in macs.items():
        sch = scheme.get(name, "none")
        by[sch] = by.get(sch, 0.0) + m
        if sch == "none":
            unprotected.append({"name": name, "op_type": op_type, "macs": m,
                                "reason": reasons.get(name, "not selected for protection")})
    for name in in_subgraphs:
        unprotected.append({"name": name, "op_type": "", "macs": None,
                            "reason": "inside an If/Loop/Scan body: not measured, not protected"})
    total = float(sum(m for _, m in macs.values()))
    unprotected.sort(key=lambda u: -(u["macs"] or 0))
    return {"macs": total, "by_scheme": by,
            "fraction": {k: (v / total if total else 0.0) for k, v in by.items()},
            "unprotected": unprotected}


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
