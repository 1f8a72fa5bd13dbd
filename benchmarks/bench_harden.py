"""Fault-free latency of ABFT-hardened graphs against the original (detection path only).

    python benchmarks/bench_harden.py                        # sample vit and a ViT-B/16, lb and standard
    python benchmarks/bench_harden.py --models vit --repeats 200 --threads 1
    python benchmarks/bench_harden.py --models vit-s16-dyn --schemes lb --threads 1 --repeats 9 --clock cpu
    python benchmarks/bench_harden.py --models vit-b16 --static --schemes lb --threads 1 --repeats 5 --clock cpu
    python benchmarks/bench_harden.py --models vit-s16-dyn --schemes lb,lb:ig --threads 1 --repeats 9 --clock cpu
    python benchmarks/bench_harden.py --models vit-s16-dyn --threads 1 --repeats 9 --clock cpu \
        --schemes lb,lb:fused@fc2,lb:fused@fc2+fc1,lb:fused@fc2+fc1+proj,lb:fused

A scheme ``lb:IMPL`` builds LB-ABFT with ``--abft-impl IMPL`` (global, fused, dup, ig: seed 004's
rule with onnxft's fused refinement, at the benchmark's batch against the cached ridge point;
``ig0``: ig by the byte rule alone, without ``FUSED_MIN_A_BYTES``, as before that measurement;
``tuned``: ig --autotune, every implementation profiled per GEMM on these inputs; ``fused@fc1+fc2``:
fused for the GEMMs whose names contain ``fc1`` or ``fc2``, global elsewhere).

(``vit-s16-dyn``: ViT-S/16-sized with a dynamic token axis, run at ``--image`` pixels.) The timed
graphs are the ones ``harden`` ships; after the timed rounds their twins with the detection flags
exposed (``abft(expose_flags=True)``, the same checks) run ``--alarm-runs`` times, untimed, on the
same inputs and every flag is counted: fault-free inputs, so any flag is a false alarm. (One
flagged twin is open at a time: ViT-B-sized sessions take about 1.5 GB each.)

Interleaved runs (original, lb, standard, original, ...) on the same inputs, medians, ratio to the
original. Sessions at onnxruntime's default level (all optimizations), CPU, batch 8 by default.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnxft import samples as ft_samples  # noqa: E402
from onnxft.campaigns.harden import fix_batch  # noqa: E402
from onnxft.passes.abft import abft, find_gemms  # noqa: E402
from vit_graph import PRESETS, build_vit  # noqa: E402


def load(name: str) -> onnx.ModelProto:
    if name in PRESETS:
        print(f"# building {name} with random weights ...", file=sys.stderr, flush=True)
        return build_vit(**PRESETS[name])
    s = ft_samples.sample_model(name)
    return onnx.load(s["path"] if s else name)


def feeds(model: onnx.ModelProto, batch: int, image: int = 224) -> dict:
    """Random inputs: a dynamic first axis is the batch, other dynamic axes (height, width) ``image``."""
    rng = np.random.default_rng(0)
    out = {}
    for i in model.graph.input:
        if i.name in {t.name for t in model.graph.initializer}:
            continue
        shape = [d.dim_value if d.dim_value else (batch if k == 0 else image)
                 for k, d in enumerate(i.type.tensor_type.shape.dim)]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def session(model: onnx.ModelProto, threads: int | None, tmp: Path, tag: str):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    path = tmp / f"{tag}.onnx"  # (ViT-B is over protobuf's comfortable size for in-memory bytes)
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit-b16")
    ap.add_argument("--schemes", default="lb,standard")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ber", type=float, default=1e-8)
    ap.add_argument("--alarm-runs", type=int, default=3, help="fault-free runs of each flagged twin")
    ap.add_argument("--tune-repeats", type=int, default=4, help="profiled rounds of lb:tuned's autotune")
    ap.add_argument("--image", type=int, default=224, help="size of dynamic spatial input axes")
    ap.add_argument("--static", action="store_true",
                    help="fix the batch axis to --batch before hardening (static shapes, as harden --batch)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the calling thread's CPU time (with --threads 1 onnxruntime runs there), "
                         "steadier on a shared machine")
    args = ap.parse_args(argv)
    print(f"# onnxruntime {ort.__version__}, CPU, batch {args.batch}, {args.repeats} interleaved repeats, "
          f"threads {args.threads or 'default'}, {args.clock} clock, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'model':<12} {'scheme':<21} {'GEMMs':>5} {'nodes+':>6} {'original ms':>11} {'hardened ms':>11} "
          f"{'ratio':>6} {'alarms':>6}")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.models.split(","):
            model = load(name)
            if args.static:
                model = fix_batch(model, args.batch)
            x = feeds(model, args.batch, args.image)
            variants = {"original": session(model, args.threads, tmp, "orig")}
            info = {}
            with_flags = {}
            shapes = {k: [1, *v.shape[1:]] for k, v in x.items()}  # representative shapes: one item
            for scheme in args.schemes.split(","):
                base_scheme, _, impl = scheme.partition(":")
                impl = impl or "global"
                if impl in ("ig", "ig0", "tuned"):
                    from onnxft.analysis.intensity import FUSED_MIN_A_BYTES
                    from onnxft.campaigns.abft_impl import resolve
                    from onnxft.runtime.ridge import ridge_point

                    impl, _ = resolve("ig", model, x, ridge_point("cpu", args.threads), tune=impl == "tuned",
                                      threads=args.threads, repeats=args.tune_repeats, scheme=base_scheme,
                                      ber=args.ber, shapes=shapes,
                                      fused_min_a_bytes=float("inf") if impl == "ig0" else FUSED_MIN_A_BYTES)
                if "@" in impl:  # IMPL@a+b: IMPL for the GEMMs whose names contain a or b, global elsewhere
                    which, _, parts = impl.partition("@")
                    impl = {g.name: which if any(p in g.name for p in parts.split("+")) else "global"
                            for g in find_gemms(model)}
                kw = dict(scheme=base_scheme, ber=args.ber, shapes=shapes, impl=impl)
                r = abft(model, **kw)
                info[scheme] = (len(r.details["gemms"]), len(r.model.graph.node) - len(model.graph.node))
                variants[scheme] = session(r.model, args.threads, tmp, scheme.replace(":", "_"))
                del r
                flagged = abft(model, expose_flags=True, **kw).model
                path = tmp / f"{scheme.replace(':', '_')}_flags.onnx"
                onnx.save(flagged, str(path))
                with_flags[scheme] = str(path)  # (a session is opened per check, one at a time)
                del flagged
            for s in variants.values():  # warm up
                for _ in range(3):
                    s.run(None, x)
            times = {k: [] for k in variants}
            alarms = {k: 0 for k in variants}
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            for i in range(args.repeats):
                order = list(variants.items())
                for k, s in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
                    t = clock()
                    s.run(None, x)
                    times[k].append(clock() - t)
            del variants
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads or 0
            for k, path in with_flags.items():  # every flag of fault-free runs is a false alarm
                s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                names = [o.name for o in s.get_outputs()]
                for _ in range(args.alarm_runs):
                    outs = s.run(None, x)
                    alarms[k] += sum(bool(v) for n, v in zip(names, outs) if n.endswith(".detected"))
                del s
            base = statistics.median(times["original"])
            for scheme in args.schemes.split(","):
                med = statistics.median(times[scheme])
                g, n = info[scheme]
                print(f"{name:<12} {scheme:<21} {g:>5} {n:>6} {base * 1e3:>11.2f} {med * 1e3:>11.2f} "
                      f"{med / base:>6.3f} {alarms[scheme]:>6}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
