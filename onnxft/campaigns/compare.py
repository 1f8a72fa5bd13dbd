"""``onnxft compare``: protection schemes side by side — accuracy under injection and overhead.

Schemes (the seed paper's Figs. 9 to 12, for the user's model):

- ``none``: the model as it is;
- ``range``: range restriction after Softmax/GELU (clamp; ``range_mode`` and ``range_kinds`` change it);
- ``standard``: standard ABFT on every protectable GEMM;
- ``sec``: standard ABFT with single-error correction only (the paper's baseline [40], [52]-[57]);
- ``lb``: LB-ABFT on every protectable GEMM (block sizes from OptBlockSizeSelection);
- ``lb+range``: both;
- ``lb+range+dmr``: both, and LayerNorm (or the ``dmr`` op types) duplicated and compared
  (``passes.dmr``);
- ``tmr``: layer-wise TMR (every layer triplicated, bitwise majority vote on what leaves it);
- ``auto``: Algorithm 1 (``campaigns.select``): LB-ABFT on the GEMMs it picks under the target and cap.
- ``clip-ranger``, ``clip-layer``, ``clip-neuron``, ``proact``: clipped activations alone
  (``passes.clip``; thresholds profiled, trained jointly per layer, per channel, or ProAct's hybrid
  trained progressively; on ``train`` items), see ``CLIP_SCHEMES`` and docs/proact.md.

Accuracy: ``evaluate`` of each hardened graph (injection into the model's own computation, common
random numbers: every scheme sees the same seeds). Overhead: expected extra operations per item
divided by the model's operations per item, at each BER — ABFT from the cost model
(``passes.blocksize``) with the block sizes the graph was built with; range restriction counts two
comparisons per restricted element; TMR counts its two extra copies of each layer plus four
operations per voted element. Optionally the measured fault-free latency ratio.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import shape_inference

from ..analysis import grouping
from ..passes.abft_conv import conv_cost
from ..passes.blocksize import lb_cost, standard_cost
from ..passes.inject import inject
from ..passes.tmr import tmr
from ..runtime.data import Dataset
from ..runtime.session import InjectionSession
from .evaluate import evaluate
from .harden import HardenOptions, harden
from .overhead import latency_overhead
from .select import check_select, matrices_per_item, register_selection, select_gemms
from .spec import CampaignSpec

SCHEMES = ("none", "range", "standard", "sec", "lb", "lb+range", "lb+range+dmr", "tmr", "auto",
           "clip-ranger", "clip-layer", "clip-neuron", "proact")
CLIP_SCHEMES = {"clip-ranger": "ranger", "clip-layer": "layer", "clip-neuron": "neuron", "proact": "proact"}


@dataclass
class Variant:
    scheme: str
    model: onnx.ModelProto
    overhead: dict  # ber -> fraction of the model's operations
    info: dict


def _range_ops(model: onnx.ModelProto, tensors: list[str]) -> int:
    """Two comparisons per element of each restricted tensor, per item (batch axis excluded)."""
    inferred = shape_inference.infer_shapes(model)
    dims = {v.name: v.type.tensor_type.shape.dim for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    total = 0
    for t in tensors:
        d = dims.get(t) or dims.get(f"{t}/unrestricted")
        if d is None:
            continue
        total += 2 * int(np.prod([x.dim_value for x in list(d)[1:] if x.dim_value > 0], dtype=np.int64))
    return total


def _abft_ops(plan: dict, ber: float) -> float:
    ops = 0.0
    for g in plan.get("gemms", []):
        rep = g.get("shape_for_costs") or {}  # (dynamic dimensions: the representative shape's)
        M, N, K = g.get("M") or rep.get("rows"), g.get("N") or rep.get("N"), g.get("K") or rep.get("K")
        if not (M and N and K):
            continue
        rows = g.get("unit_rows") or rep.get("rows") or M
        if g["scheme"] == "lb" and g.get("block_size"):
            c = lb_cost(rows, N, K, ber, int(g["block_size"]))["total"]
        else:
            c = standard_cost(rows, N, K, ber, recompute_multiple=g["scheme"] != "sec")["total"]
        ops += c * matrices_per_item(g)
    for c in plan.get("convs", []):
        if c.get("M"):
            ops += conv_cost(c["M"] * c.get("group", 1), c["N"], c["K"], ber)["total"]
    return ops


def model_ops(model: onnx.ModelProto, data: Dataset) -> tuple[float, list, object]:
    """Operations per item of every fault site of ``model``, its site plans and its site table."""
    sess = InjectionSession(inject(model).model, "cpu")
    plans = sess.plans(data.batch(0, 1))
    return float(sum(p.operations_per_item for p in plans)), plans, sess.table


def build_variants(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, calib: Dataset | None,
                   progress=None, train: Dataset | None = None, clip_options=None, store=None, workers: int = 1,
                   ray_address: str | None = None) -> list[Variant]:
    """The hardened graph of each of ``spec.schemes`` with its expected overhead at each of ``spec.bers``
    (block sizes and Algorithm 1 for ``spec.algorithm_ber``); ``train`` and ``clip_options`` serve the
    clip schemes (``CLIP_SCHEMES``). ``store``, ``workers``, ``ray_address``: where ``auto`` commits
    Algorithm 1's units and what runs them (``select.select_gemms``)."""
    schemes, bers, design_ber = list(spec.schemes), list(spec.bers), spec.algorithm_ber
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise ValueError(f"unknown scheme(s) {bad}; choose from {', '.join(SCHEMES)}")
    say = progress or (lambda _m: None)
    total, plans, table = model_ops(model, data)
    out = []
    for scheme in schemes:
        say(f"building {scheme}")
        info: dict = {}
        if scheme == "none":
            out.append(Variant(scheme, model, {b: 0.0 for b in bers}, info))
            continue
        if scheme == "tmr":
            layers = [g for g in grouping.layers(table, model) if g.name not in ("stem", "head", "other")]
            m, ops, voted = model, 0.0, 0
            for g in layers:
                if g.name.startswith("segment."):
                    continue  # structural segments have no name scope to select nodes by
                pattern = rf"(^|/){re.escape(g.name)}(/|$)"
                r = tmr(m, pattern)
                if r.skipped:
                    continue
                m = r.model
                ops += 2 * sum(plans[i].operations_per_item for i in g.sites)
                voted += len(r.details["voted"])
            info = {"layers": len(layers), "voted_tensors": voted}
            out.append(Variant(scheme, m, {b: ops / total for b in bers}, info))
            continue
        if scheme == "auto":
            sel = select_gemms(model, data, spec, progress=lambda msg: say(f"  {msg}"), store=store,
                               workers=workers, ray_address=ray_address)
            info = {"chosen": sel.chosen, "estimated_accuracy": sel.accuracy, "reached": sel.reached,
                    "design_overhead": sel.overhead}
            if not sel.chosen:
                out.append(Variant(scheme, model, {b: 0.0 for b in bers}, info))
                continue
            opts = HardenOptions(abft="lb", range_mode="none", ber=design_ber, precision=spec.precision,
                                 abft_impl=spec.abft_impl, provider=spec.provider, threads=spec.threads,
                                 gemms="^(" + "|".join(re.escape(c) for c in sel.chosen) + ")$")
        elif scheme in CLIP_SCHEMES:
            from dataclasses import replace as _replace

            from .train_clip import ClipTrainOptions

            clip = _replace(clip_options or ClipTrainOptions(), method=CLIP_SCHEMES[scheme])
            opts = HardenOptions(abft="none", range_mode="none", ber=design_ber, clip=clip)
        else:
            abft_scheme = {"range": "none", "standard": "standard", "sec": "sec"}.get(scheme, "lb")
            opts = HardenOptions(abft=abft_scheme, range_mode=spec.range_mode if "range" in scheme else "none",
                                 range_kinds=tuple(spec.range_kinds), alpha=spec.alpha, ber=design_ber,
                                 dmr=tuple(spec.dmr) if scheme.endswith("+dmr") else (), precision=spec.precision,
                                 abft_impl=spec.abft_impl if abft_scheme == "lb" else "global",
                                 provider=spec.provider, threads=spec.threads)
        res = harden(model, opts, calib, train=train)
        plan = res.plan
        r_ops = _range_ops(res.model, [r["tensor"] for r in plan.get("ranges", [])])
        if plan.get("dmr"):  # the copies' operations, and one comparison per element
            dup = set(plan["dmr"]["nodes"])
            r_ops += sum(p.operations_per_item for p, s in zip(plans, table.sites) if s.origin_node in dup)
            r_ops += _range_ops(res.model, plan["dmr"]["tensors"]) / 2
        if plan.get("clip"):  # two comparisons per clipped element, like a range check
            r_ops += _range_ops(res.model, [layer["tensor"] for layer in plan["clip"]["layers"]])
            info["clip"] = {k: plan["clip"][k] for k in ("method", "mode", "thresholds", "bytes", "train_seconds",
                                                          "objective", "train_items", "peak_rss_mb", "cache_bytes")}
        over = {b: (_abft_ops(plan, b) + r_ops) / total for b in bers}
        info.update({"gemms": len(plan.get("gemms", [])), "ranges": len(plan.get("ranges", []))})
        out.append(Variant(scheme, res.model, over, info))
    return out


def compare(model: onnx.ModelProto, data: Dataset, spec: CampaignSpec, calib: Dataset | None = None,
            progress=None, store=None, workers: int = 1, ray_address: str | None = None,
            train: Dataset | None = None, clip_options=None) -> dict:
    """Accuracy (top-1 with 95% intervals), outcome rates (SDC, DUE, masked) and overhead of each
    of ``spec.schemes`` at each of ``spec.bers``.

    ``spec.selection.include_protection`` (``--inject-protection``): fault each scheme's protection
    too (checksums, range checks, voters and the ABFT recovery recomputes), not only the model's own
    computation. Every scheme's evaluation uses the spec's site selection, outcome options, trials,
    seed, batch, provider and threads (common random numbers: every scheme sees the same seeds).
    ``store``, ``workers``, ``ray_address``: as ``evaluate`` (each scheme is a part of the stored
    campaign; a resumed compare rebuilds the schemes and runs only their missing units). ``auto``'s
    Algorithm 1 is one more part, ``select:MODEL_NAME`` (``select.select_gemms``): its units are
    committed to the same store and run on the same workers, so a resumed compare measures only the
    ones it lacks and chooses the same GEMMs."""
    if data.labels is None:
        raise ValueError("compare needs labelled data (an array 'y' in the .npz)")
    if not spec.schemes:
        raise ValueError("compare needs at least one scheme")
    spec = spec.replace(design_ber=spec.algorithm_ber)
    eval_spec = spec.replace(metric="top1")
    if store is not None:
        # every part before any work: a resume with other options stops at once, and a compare
        # interrupted before its last scheme (or inside Algorithm 1) finds all its parts on resume
        for scheme in spec.schemes:
            store.register(scheme, "eval", eval_spec.replace(model_name=scheme).to_json())
        if "auto" in spec.schemes:
            check_select(spec)
            register_selection(store, spec)
    variants = build_variants(model, data, spec, calib, progress, train=train, clip_options=clip_options,
                              store=store, workers=workers, ray_address=ray_address)
    rows, results = [], []
    for v in variants:
        if progress:
            progress(f"evaluating {v.scheme}")
        r = evaluate(v.model, data, eval_spec.replace(model_name=v.scheme), store=store, workers=workers,
                     ray_address=ray_address)
        d = r.to_dict()
        d["model"] = v.scheme
        results.append(d)
        row = {"scheme": v.scheme, "clean": r.clean, "info": v.info, "points": []}
        for p in r.points:
            row["points"].append({"ber": p.ber, "accuracy": p.value, "ci": list(p.ci),
                                  "sdc": p.sdc, "sdc_ci": list(p.sdc_ci), "due": p.due, "due_ci": list(p.due_ci),
                                  "masked": p.masked, "overhead_ops": v.overhead.get(p.ber, 0.0)})
        if spec.latency:
            row["latency"] = latency_overhead(model, v.model, 8, spec.provider, repeats=20, threads=spec.threads)
        rows.append(row)
    return {"schemes": rows, "bers": list(spec.bers), "design_ber": spec.design_ber,
            "range": {"mode": spec.range_mode, "ops": list(spec.range_kinds), "alpha": spec.alpha},
            "dmr": list(spec.dmr), "precision": spec.precision, "abft_impl": spec.abft_impl, "items": len(data), "trials": spec.trials,
            "inject_protection": spec.selection.include_protection,
            "fault_constants": spec.selection.fault_constants,
            "outputs": results[0]["outputs"] if results else {}, "spec": spec.to_json(),
            "eval_results": results}
