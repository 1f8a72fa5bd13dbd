"""Where a hardened file's bytes are: initializers and Constant nodes, by graph depth, of the
original and the hardened model, and the largest tensors the hardening added (issue 11: "hardened
file at most 1.05x the original plus checksum vectors").

    python benchmarks/hardened_size.py ORIGINAL.onnx HARDENED.onnx [--top 10]

Depth 0 is the main graph; depth d the bodies of If/Loop/Scan nodes d levels down (a GEMM's LB
recovery branch is depth 1). A tensor "added" is one whose name is not in the original.
"""
from __future__ import annotations

import argparse
import os

import onnx
from onnx import numpy_helper


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in t.external_data if e.key == "length"), 0)
    if t.raw_data:
        return len(t.raw_data)
    return int(numpy_helper.to_array(t).nbytes)


def tensors(graph: onnx.GraphProto, depth: int = 0):
    """``(depth, name, dims, bytes)`` of every initializer and Constant node value, at any depth."""
    for t in graph.initializer:
        yield depth, t.name, list(t.dims), _nbytes(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    yield depth, n.output[0], list(a.t.dims), _nbytes(a.t)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from tensors(sub, depth + 1)


def by_depth(model: onnx.ModelProto) -> dict[int, int]:
    out: dict[int, int] = {}
    for d, _, _, b in tensors(model.graph):
        out[d] = out.get(d, 0) + b
    return out


def audit(original: str, hardened: str, top: int = 10) -> dict:
    mo, mh = onnx.load(original, load_external_data=False), onnx.load(hardened, load_external_data=False)
    names = {name for _, name, _, _ in tensors(mo.graph)}
    added = sorted(((b, d, name, dims) for d, name, dims, b in tensors(mh.graph) if name not in names), reverse=True)
    return {"file": (os.path.getsize(original), os.path.getsize(hardened)),
            "depth": (by_depth(mo), by_depth(mh)), "added_bytes": sum(a[0] for a in added), "top": added[:top]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("hardened")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    r = audit(args.original, args.hardened, args.top)
    fo, fh = r["file"]
    print(f"file: {fo / 1e6:.2f} MB -> {fh / 1e6:.2f} MB ({fh / fo:.3f}x)")
    do, dh = r["depth"]
    for d in sorted(set(do) | set(dh)):
        print(f"  depth {d}: constants {do.get(d, 0) / 1e6:.3f} MB -> {dh.get(d, 0) / 1e6:.3f} MB")
    print(f"  added tensors: {r['added_bytes'] / 1e6:.3f} MB; largest:")
    for b, d, name, dims in r["top"]:
        print(f"    {b / 1e3:10.1f} kB  depth {d}  {dims}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
