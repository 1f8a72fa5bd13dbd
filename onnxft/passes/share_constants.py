"""One copy of every large constant that a graph holds several times.

ABFT derives constants from each GEMM's weight (block checksums ``B E``, ``|B| E``) and writes
them as ``Constant`` nodes inside the GEMM's recovery branch. Where a model shares one weight
between many GEMMs (an unrolled LSTM: every time step's cell reads the same ``W_ih``), each GEMM
gets its own copy of the same values: captcha_crnn's 20 steps x 2 directions made its hardened
file 2.29x the original. ``share_constants`` keeps one main-graph initializer per distinct value
and turns every ``Constant`` node holding it, at any depth of ``If``/``Loop``/``Scan`` bodies, into
an ``Identity`` of that initializer (read by outer-scope name, as the recovery branches already
read the weights). An initializer of the main graph that holds the same value is used as is; main-graph
initializers that repeat one another (the row checksums ``B e`` of GEMMs sharing a weight) are
merged, their readers renamed.
Values and computations are unchanged; only the file shrinks.
"""
from __future__ import annotations

import copy
import hashlib

import onnx
from onnx import helper, numpy_helper

from ..graph.edit import walk
from .result import PassResult

MIN_BYTES = 4096  # smaller constants are not worth an extra node


def _key(t: onnx.TensorProto) -> tuple | None:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    raw = t.raw_data or numpy_helper.to_array(t).tobytes()
    if len(raw) < MIN_BYTES:
        return None
    return t.data_type, tuple(t.dims), hashlib.sha256(raw).hexdigest()


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    return a.t if a.name == "value" and a.type == onnx.AttributeProto.TENSOR else None


def share_constants(model: onnx.ModelProto) -> PassResult:
    """Copy of ``model`` with repeated large constants stored once (see the module docstring)."""
    out = copy.deepcopy(model)
    found: dict = {}  # key -> [Constant nodes]
    for _, node in walk(out.graph):
        t = _constant_tensor(node)
        k = _key(t) if t is not None else None
        if k is not None:
            found.setdefault(k, []).append(node)
    inits, renamed = {}, {}
    io = {v.name for v in list(out.graph.input) + list(out.graph.output)}  # (overridable or returned: kept)
    for t in out.graph.initializer:
        k = _key(t)
        if k is None or t.name in io:
            continue
        if k in inits:
            renamed[t.name] = inits[k]
        else:
            inits[k] = t.name
    result = PassResult(model=out)
    if renamed:  # a main-graph initializer repeated: one kept, every reader (at any depth) reads it
        kept = [t for t in out.graph.initializer if t.name not in renamed]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        for _, node in walk(out.graph):
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
        gone = set(renamed)
        vis = [v for v in out.graph.value_info if v.name not in gone]
        del out.graph.value_info[:]
        out.graph.value_info.extend(vis)
    taken = {t.name for t in out.graph.initializer} | {o for _, n in walk(out.graph) for o in n.output}
    saved = 0
    for k, nodes in found.items():
        if len(nodes) < 2 and k not in inits:
            continue
        shared = inits.get(k)
        if shared is None:
            shared = f"onnxft.shared.{k[2][:16]}"
            while shared in taken:
                shared += "_"
            taken.add(shared)
            t = onnx.TensorProto()
            t.CopyFrom(_constant_tensor(nodes[0]))
            t.name = shared
            out.graph.initializer.append(t)
            saved -= 1
        for node in nodes:
            meta = list(node.metadata_props)
            ident = helper.make_node("Identity", [shared], list(node.output), name=node.name)
            ident.metadata_props.extend(meta)
            node.CopyFrom(ident)
            saved += 1
        size = len(_constant_tensor_bytes(out, shared))
        result.inserted.append(f"{shared}: {len(nodes)} copies -> 1 ({size} bytes each)")
        result.details[shared] = {"copies": len(nodes), "bytes": size}
    result.details = {"shared": result.details, "copies_removed": saved + len(renamed),
                      "initializers_merged": len(renamed)}
    return result


def _constant_tensor_bytes(model: onnx.ModelProto, name: str) -> bytes:
    t = next(t for t in model.graph.initializer if t.name == name)
    return t.raw_data or numpy_helper.to_array(t).tobytes()
