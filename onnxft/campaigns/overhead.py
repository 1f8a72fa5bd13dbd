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


def _profile_ms(model: onnx.ModelProto, feeds: dict, provider: str, threads: int | None, level: str,
                repeats: int) -> dict[str, float]:
    """Median kernel time (ms) per node name over ``repeats`` runs, from onnxruntime's profile.
    Nodes inside ``If`` branches have events of their own (an ``If``'s event is its dispatch only).
    Medians, because one descheduled kernel on a shared machine would dominate a mean."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sess = profiling_session(model, os.path.join(tmp, "profile"), provider, threads, level)
        outputs = [o.name for o in sess.get_outputs()]
        for _ in range(repeats + 1):  # the first run (allocations, caches) is dropped below
            sess.run(outputs, feeds)
        return profile_medians(sess.end_profiling())


def profiling_session(model, prefix: str, provider: str = "auto", threads: int | None = None,
                      level: str = "all"):
    """An onnxruntime session of ``model`` (a ModelProto or a path) that profiles every run into a
    file starting with ``prefix``."""
    from ..runtime.session import _ort, providers_for

    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=providers_for(provider))


def profile_medians(path: str) -> dict[str, float]:
    """Median kernel time (ms) per node name over the runs of one onnxruntime profile file, the
    first run (allocations, caches) dropped."""
    import json

    with open(path) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    per_run: dict[str, np.ndarray] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = next((i for i, (t0, t1) in enumerate(runs) if t0 <= e["ts"] <= t1), None)
        if k is None:
            continue
        name = e["name"][: -len("_kernel_time")]
        per_run.setdefault(name, np.zeros(len(runs)))[k] += e["dur"] / 1e3
    return {name: float(np.median(t)) for name, t in per_run.items()}


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed main-graph nodes get names (``onnxft.unnamed.<i>``), so the profile can tell them apart."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    used = {n.name for n in named.graph.node}
    for i, n in enumerate(named.graph.node):
        if not n.name:
            n.name = f"onnxft.unnamed.{i}"
            while n.name in used:
                n.name += "_"
            used.add(n.name)
    return named


def protection_units(model: onnx.ModelProto) -> dict[str, str]:
    """Main-graph protection node name -> the protected unit it belongs to: the GEMM/Conv (or other
    node) whose output an ABFT/DMR check reads (``<prefix>/unchecked``), else the kind of protection."""
    import json

    from ..graph.roles import PROTECTION, RECOVERY_KEY, meta_of, role_of

    owner = {}
    for n in model.graph.node:
        for o in n.output:
            if o.endswith("/unchecked"):
                owner.setdefault(o[: -len("/unchecked")], n.name or o)
        recovery = meta_of(n, RECOVERY_KEY)
        if recovery and n.name.startswith("onnxft."):  # an ABFT If names the GEMM/Conv it protects
            owner[n.name.split("/")[0]] = json.loads(recovery)["unit"]
    units = {}
    for n in model.graph.node:
        if role_of(n) != PROTECTION:
            continue
        prefix = n.name.split("/")[0] if n.name.startswith("onnxft.") else ""
        units[n.name] = owner.get(prefix, "range restriction" if n.op_type in (
            "Clip", "IsNaN", "Where", "Greater", "Less", "And", "Equal") else "other protection")
    return units


def per_layer_overhead(baseline: onnx.ModelProto, model: onnx.ModelProto, batch: int = 8, provider: str = "auto",
                       repeats: int = 20, seed: int = 0, feeds: dict | None = None, threads: int | None = None,
                       level: str = "all") -> dict:
    """Where a hardened model's fault-free time goes, per protected unit, from onnxruntime's profile.

    For each protected GEMM/Conv: its own kernel time in the baseline and in the hardened graph, and
    the time of the protection nodes that belong to it (the check in the main graph and the ``If``
    with its branches). ``changed_ms`` is how much longer the model's own nodes take in the hardened
    graph (e.g. a fusion onnxruntime no longer applies, or a layout reorder it now inserts). Times
    are per-node medians over ``repeats`` profiled runs in milliseconds; profiling slows both graphs
    alike, so read shares and ratios rather than absolute times."""
    specs = input_specs(baseline)
    feeds = feeds if feeds is not None else synthetic(specs, batch, seed)
    base_named, model_named = _named(with_static_inputs(baseline, feeds)), _named(with_static_inputs(model, feeds))
    units = protection_units(model_named)
    by_prefix = {n.split("/")[0]: u for n, u in units.items() if n.startswith("onnxft.")}
    base = _profile_ms(base_named, feeds, provider, threads, level, repeats)
    hard = _profile_ms(model_named, feeds, provider, threads, level, repeats)
    rows: dict[str, dict] = {}
    own_ms = 0.0
    for name, ms in hard.items():
        unit = units.get(name) or by_prefix.get(name.split("/")[0])  # (branch nodes: by their prefix)
        if unit is None:
            own_ms += ms
            continue
        row = rows.setdefault(unit, {"unit": unit, "protection_ms": 0.0, "nodes": 0})
        row["protection_ms"] += ms
        row["nodes"] += 1
    base_total, hard_total = sum(base.values()), sum(hard.values())
    changed = own_ms - base_total  # the model's own nodes, as onnxruntime ran them in each graph

    def unit_time(name: str):  # the unit's kernel in the baseline, also under a fused node's name
        hits = [ms for n, ms in base.items() if n == name or n.startswith(name + "/")]
        return sum(hits) if hits else None

    for row in rows.values():
        row["unit_ms"] = unit_time(row["unit"])
        row["share_of_model"] = row["protection_ms"] / base_total if base_total else 0.0
    ordered = sorted(rows.values(), key=lambda r: -r["protection_ms"])
    return {"baseline_ms": base_total, "model_ms": hard_total, "ratio": hard_total / base_total if base_total else None,
            "protection_ms": sum(r["protection_ms"] for r in ordered), "changed_ms": changed,
            "units": ordered, "repeats": repeats, "level": level, "batch": batch}
