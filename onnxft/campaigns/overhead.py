"""Fault-free latency of a hardened model against its baseline: ``onnxft bench HARDENED --baseline MODEL``.

Runs alternate (baseline, hardened, baseline, …) on the same inputs with the same session options, so
machine noise hits both alike; the figures are medians.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from ..runtime.data import input_specs, synthetic
from ..runtime.session import make_session, with_static_inputs


def latency_overhead(baseline: onnx.ModelProto, model: onnx.ModelProto, batch: int = 8, provider: str = "auto",
                     repeats: int = 20, warmup: int = 3, seed: int = 0, feeds: dict | None = None,
                     threads: int | None = None, level: str = "all", clock=time.perf_counter) -> dict:
    """Median per-inference time of ``baseline`` and ``model`` and their ratio. ``clock``: wall
    clock by default; ``time.thread_time`` with ``threads=1`` gives CPU time, steadier on a
    shared machine."""
    if batch < 1 or repeats < 1:
        raise ValueError("batch and repeats must be at least 1")
    specs = input_specs(baseline)
    if [s.name for s in specs] != [s.name for s in input_specs(model)]:
        raise ValueError("the model and its baseline take different inputs")
    feeds = feeds if feeds is not None else synthetic(specs, batch, seed)
    sessions = [make_session(with_static_inputs(m, feeds), provider, threads, level=level) for m in (baseline, model)]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for s, n in zip(sessions, names):
            s.run(n, feeds)
    times = [[], []]
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first: caches favour neither
        for k in order:
            t0 = clock()
            sessions[k].run(names[k], feeds)
            times[k].append(clock() - t0)
    base_ms, model_ms = (float(np.median(t) * 1e3) for t in times)
    return {"baseline_ms": base_ms, "model_ms": model_ms, "ratio": model_ms / base_ms, "overhead": model_ms / base_ms - 1,
            "batch": batch, "repeats": repeats, "provider": sessions[1].get_providers()[0], "level": level}
