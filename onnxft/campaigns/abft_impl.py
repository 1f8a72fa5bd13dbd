"""Which ABFT implementation each GEMM gets (``harden --abft-impl``, docs/abft.md "Implementations").

``global``, ``fused`` and ``dup`` are graph forms of the pass (``passes.abft.IMPLS``); this module
turns the two per-GEMM policies into plain data the pass takes (``{gemm name: impl}``):

- ``ig`` (seed 004's rule): each GEMM's arithmetic intensity at the deployment shapes
  (``analysis.intensity``, one fault-free run) against the device's ridge point
  (``runtime.ridge``): ``global`` at or above the ridge (compute-bound), ``MEMORY_BOUND_IMPL``
  below it; among compute-bound GEMMs with a constant weight, ``fused`` where its check moves
  fewer bytes than global's (``analysis.intensity.check_bytes``) or where ``A`` outgrows a core's
  L2 cache (``FUSED_MIN_A_BYTES``: global's extra pass over ``A`` then goes to memory).
- ``ig`` with ``autotune``: every candidate is built for every GEMM it fits, the candidate graphs
  are profiled interleaved on the target provider (one run of each per round, medians per node),
  and each GEMM keeps the candidate whose own kernels plus protection nodes cost least.

Both run sessions, so they live here, not in the pass; the result records, per GEMM, its AI, the
ridge point, the predicted regime, the choice and (autotune) each candidate's measured cost.
"""
from __future__ import annotations

import os
import tempfile

import onnx

from ..analysis.intensity import (FUSED_MIN_A_BYTES, MEMORY_BOUND_IMPL, check_bytes, choose_impl, gemm_intensities,
                                  regime)
from ..passes.abft import IMPLS, abft, input_lower_bounds
from .overhead import _named, profile_medians, profiling_session, protection_units

POLICIES = IMPLS + ("ig",)


def ig_choices(model: onnx.ModelProto, feeds: dict, ridge: float, provider: str = "cpu",
               memory_impl: str = MEMORY_BOUND_IMPL, fused_min_a_bytes: float = FUSED_MIN_A_BYTES) -> dict[str, dict]:
    """``{gemm name: {"ai", "ridge", "regime", "impl", "M", "N", "K", "gemms", ...}}`` at the shapes the
    model runs at on ``feeds``: seed 004's rule (``memory_impl`` below the ridge, ``global`` at or
    above it), and, for a compute-bound GEMM with a constant weight, ``fused`` instead of ``global``
    where its check moves fewer bytes (``analysis.intensity.check_bytes``: an MLP's second Linear,
    whose input, a GELU output, is bounded below and ``K = 4 N`` wide) or where ``A`` is at least
    ``fused_min_a_bytes`` (measured: global's extra pass over an ``A`` beyond L2 costs more than
    fused's extra columns; ``inf``: the byte rule alone, ig before that measurement);
    ``check_bytes`` and ``a_bytes`` are recorded."""
    if memory_impl not in IMPLS:
        raise ValueError(f"unknown ABFT implementation {memory_impl!r}")
    bounds = input_lower_bounds(model)
    out = {}
    for c in gemm_intensities(model, feeds, provider):
        if c.op_type == "Conv":
            continue
        row = {"ai": c.ai, "ridge": ridge, "regime": regime(c.ai, ridge), "impl": choose_impl(c.ai, ridge, memory_impl),
               "M": c.M, "N": c.N, "K": c.K, "gemms": c.gemms}
        if c.name in bounds and row["regime"] == "compute":
            row["check_bytes"] = check_bytes(c.M * c.gemms, c.N, c.K, ridge, bounds[c.name] is not None)
            row["a_bytes"] = a_bytes = 4 * c.M * c.gemms * c.K  # (fused is built for float32 weights only)
            if row["check_bytes"]["fused"] < row["check_bytes"]["global"] or a_bytes >= fused_min_a_bytes:
                row["impl"] = "fused"
        out[c.name] = row
    return out


def unit_costs(model: onnx.ModelProto, plan: list[dict], times: dict[str, float]) -> dict[str, float]:
    """Per protected GEMM (by name), the profiled milliseconds of its own kernels (the GEMM, its bias
    Add, and any node onnxruntime fused them into, named ``<node>/...``) plus its protection nodes
    (main graph and ``If`` branches)."""
    units = protection_units(model)
    by_prefix = {n.split("/")[0]: u for n, u in units.items() if n.startswith("onnxft.")}
    own = {}
    for g in plan:
        for n in (g["name"], g.get("bias")):
            if n:
                own[n] = g["name"]
    cost = {g["name"]: 0.0 for g in plan}
    for name, ms in times.items():
        unit = units.get(name) or by_prefix.get(name.split("/")[0])
        if unit is None:
            unit = own.get(name) or own.get(name.split("/")[0])
        if unit in cost:
            cost[unit] += ms
    return cost


def autotune(model: onnx.ModelProto, feeds: dict, candidates=IMPLS, provider: str = "cpu", threads: int | None = None,
             repeats: int = 10, level: str = "all", **abft_kwargs) -> dict[str, dict]:
    """``{gemm name: {"impl": fastest, "costs_ms": {candidate: ms}}}``: each candidate built for every
    GEMM (a GEMM it does not fit keeps global and gets no cost for it), the graphs profiled
    interleaved (``repeats`` rounds, alternating order), per-node medians summed per GEMM."""
    built = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in candidates:  # (one candidate graph in memory at a time: ViT-B-sized graphs are large)
            r = abft(model, impl=c, **abft_kwargs)
            plan = r.details["gemms"]
            named = _named(r.model)
            del r
            path = os.path.join(tmp, f"{c}.onnx")
            onnx.save(named, path)
            sessions[c] = profiling_session(path, os.path.join(tmp, c), provider, threads, level)
            built[c] = (_without_weights(named), plan)
            del named
        names = {c: [o.name for o in s.get_outputs()] for c, s in sessions.items()}
        order = list(sessions)
        for i in range(repeats + 1):  # (profile_medians drops the first run)
            for c in (order if i % 2 == 0 else order[::-1]):
                sessions[c].run(names[c], feeds)
        times = {c: profile_medians(s.end_profiling()) for c, s in sessions.items()}
        del sessions
    out: dict[str, dict] = {}
    for c, (m, plan) in built.items():
        costs = unit_costs(m, plan, times[c])
        for g in plan:
            row = out.setdefault(g["name"], {"costs_ms": {}})
            if g["impl"] == c:
                row["costs_ms"][c] = costs[g["name"]]
    for row in out.values():
        row["impl"] = min(row["costs_ms"], key=row["costs_ms"].get) if row["costs_ms"] else "global"
    return out


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's nodes only (what ``unit_costs`` reads), without the initializers' bytes."""
    g = onnx.GraphProto()
    g.node.extend(model.graph.node)
    out = onnx.ModelProto()
    out.graph.CopyFrom(g)
    return out


def resolve(policy: str, model: onnx.ModelProto, feeds: dict, ridge_info: dict | None = None,
            tune: bool = False, provider: str = "cpu", threads: int | None = None, repeats: int = 10,
            fused_min_a_bytes: float = FUSED_MIN_A_BYTES, **abft_kwargs) -> tuple[object, dict]:
    """(what ``abft(impl=...)`` takes, the plan's ``"abft_impl"`` record) for ``policy``: a fixed
    implementation everywhere, or ``ig`` (by AI; with ``tune``, by measured cost)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown ABFT implementation {policy!r}; choose from {', '.join(POLICIES)}")
    if policy != "ig":
        if tune:
            raise ValueError("--autotune chooses per GEMM: use it with --abft-impl ig")
        return policy, {"policy": policy}
    ridge = float(ridge_info["ridge"])
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else None
    per_gemm = ig_choices(model, feeds, ridge, provider, fused_min_a_bytes=fused_min_a_bytes)
    record = {"policy": "ig", "autotune": tune, "ridge": ridge_info, "batch": batch, "gemms": per_gemm}
    if tune:
        measured = autotune(model, feeds, IMPLS, provider, threads, repeats, **abft_kwargs)
        for name, row in measured.items():
            per_gemm.setdefault(name, {}).update(impl=row["impl"], costs_ms=row["costs_ms"])
        record["repeats"] = repeats
    return {name: g["impl"] for name, g in per_gemm.items()}, record


def merge_into_plan(gemms: list[dict], record: dict) -> None:
    """Copy the per-GEMM intensity and choice into the pass's plan entries (in place)."""
    per = record.get("gemms") or {}
    for g in gemms:
        info = per.get(g["name"])
        if info:
            g.update({k: info[k] for k in ("ai", "ridge", "regime", "costs_ms") if k in info})
            g["impl_chosen"] = info.get("impl")


__all__ = ["POLICIES", "MEMORY_BOUND_IMPL", "ig_choices", "autotune", "resolve", "merge_into_plan", "unit_costs"]