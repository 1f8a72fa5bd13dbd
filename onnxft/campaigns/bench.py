"""Per-inference time of the clean model and of its injection graph, measured side by side.

Runs alternate (clean, injected, clean, injected, …) so that machine noise hits both alike; the
figures are medians. The injected time covers everything one faulty inference costs: sampling the
faults for the batch, building the fault tables, and the run.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from ..faults.sampling import DEFAULT_MAX_FAULTS, Faults, check_fault_budget, sample_faults
from ..passes.inject import SiteSelection
from ..runtime.data import input_specs, synthetic
from ..runtime.session import InjectionSession, make_session, with_static_inputs
from .evaluate import campaign_graph, trial_rng


def bench(model: onnx.ModelProto, ber: float = 1e-8, batch: int = 8, provider: str = "auto",
          repeats: int = 20, warmup: int = 3, seed: int = 0, feeds: dict | None = None,
          selection: SiteSelection | None = None, threads: int | None = None,
          max_faults: float | None = DEFAULT_MAX_FAULTS) -> dict:
    """``feeds``: one batch (``api.example_feeds``); default: synthetic inputs of ``batch`` items."""
    if not (0.0 <= ber <= 1.0):
        raise ValueError(f"BER must be in [0, 1], got {ber}")
    if batch < 1 or repeats < 1:
        raise ValueError("batch and repeats must be at least 1")
    feeds = feeds if feeds is not None else synthetic(input_specs(model), batch, seed)
    # Both sessions see static input shapes, so both get onnxruntime's static memory planning.
    clean = make_session(with_static_inputs(model, feeds), provider, threads)
    injected = InjectionSession(campaign_graph(model, selection), provider, threads)
    plans = injected.plans(feeds)
    check_fault_budget(plans, ber, max_faults)  # before any timing
    out_names = [o.name for o in clean.get_outputs()]

    def run_clean():
        clean.run(out_names, feeds)

    n_faults = []

    def run_injected(i):
        faults = sample_faults(plans, ber, trial_rng(seed, i, 0), max_faults) if ber > 0 else Faults.empty()
        n_faults.append(len(faults))
        injected.run(feeds, faults, plans)

    for i in range(warmup):
        run_clean()
        run_injected(10_000 + i)
    n_faults.clear()
    tc, ti = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        run_clean()
        t1 = time.perf_counter()
        run_injected(i)
        t2 = time.perf_counter()
        tc.append(t1 - t0)
        ti.append(t2 - t1)
    clean_ms = float(np.median(tc) * 1e3)
    injected_ms = float(np.median(ti) * 1e3)
    return {"clean_ms": clean_ms, "injected_ms": injected_ms, "ratio": injected_ms / clean_ms,
            "batch": batch, "ber": ber, "repeats": repeats, "faults_per_run": float(np.mean(n_faults)),
            "sites": len(injected.table.sites), "provider": ",".join(injected.providers)}
