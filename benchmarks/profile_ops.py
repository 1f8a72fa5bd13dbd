"""Kernel time by op type of a hardened ViT-sized graph against its original (onnxruntime's profile).

    python benchmarks/profile_ops.py --model vit-b16 --static --impl ig       # ViT-B/16, batch 8 fixed
    python benchmarks/profile_ops.py --model vit-s16-dyn --impl global --runs 5

Both graphs run on one onnxruntime thread at the default optimisation level, with profiling on;
the ``*_kernel_time`` events are summed per (new or original node, op type) and averaged over the
runs (two warm-up runs included). Nodes are "NEW" when their name is not in the original graph
(onnxruntime's fusions rename nodes, so a fused original kernel can show up as NEW too: read the
totals and the differences together). Prints the totals and every op type whose time changed by
more than 0.5 ms.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_harden import feeds  # noqa: E402
from vit_graph import PRESETS, build_vit  # noqa: E402

from onnxft.campaigns.harden import fix_batch  # noqa: E402
from onnxft.passes.abft import abft  # noqa: E402


def kernel_times(model: onnx.ModelProto, x: dict, runs: int, tmp: Path, tag: str) -> dict:
    path = tmp / f"{tag}.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / f"{tag}_prof")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 2):
        s.run(None, x)
    events = json.loads(Path(s.end_profiling()).read_text())
    out = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            out[(e["name"][:-len("_kernel_time")], e["args"].get("op_name"))] += e["dur"] / 1e3 / (runs + 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-b16", choices=sorted(PRESETS))
    ap.add_argument("--static", action="store_true", help="fix the batch axis to --batch (as harden --batch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--impl", default="ig", help="global, fused, dup or ig (by arithmetic intensity, this machine)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    model = build_vit(**PRESETS[args.model])
    if args.static:
        model = fix_batch(model, args.batch)
    x = feeds(model, args.batch)
    shapes = {k: [1, *v.shape[1:]] for k, v in x.items()}
    impl = args.impl
    if impl == "ig":
        from onnxft.campaigns.abft_impl import resolve
        from onnxft.runtime.ridge import ridge_point

        impl, _ = resolve("ig", model, x, ridge_point("cpu", 1), threads=1, scheme="lb", ber=1e-8, shapes=shapes)
        print("# ig:", dict(collections.Counter(impl.values())))
    hardened = abft(model, scheme="lb", ber=1e-8, shapes=shapes, impl=impl).model
    original_nodes = {n.name for n in model.graph.node}
    with tempfile.TemporaryDirectory() as td:
        before = kernel_times(model, x, args.runs, Path(td), "original")
        after = kernel_times(hardened, x, args.runs, Path(td), "hardened")

    def by_op(times):
        out = collections.defaultdict(float)
        for (node, op), ms in times.items():
            out[("orig" if node in original_nodes else "NEW", op)] += ms
        return out

    b, a = by_op(before), by_op(after)
    print(f"# {args.model}, batch {args.batch}, impl {args.impl}, {args.runs} runs, one thread: kernel time "
          f"{sum(b.values()):.1f} -> {sum(a.values()):.1f} ms")
    for k in sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) - b.get(k, 0))):
        d = a.get(k, 0) - b.get(k, 0)
        if abs(d) > 0.5:
            print(f"{k[0]:4} {k[1]:22} original {b.get(k, 0):8.1f}  hardened {a.get(k, 0):8.1f}  {d:+8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
