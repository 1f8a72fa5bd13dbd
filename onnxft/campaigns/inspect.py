"""``onnxft inspect``: the fault sites of a model, their operation counts and GEMM shapes.

Counts come from one fault-free run of the injection graph on a synthetic batch of one item, so
they hold for the model's real shapes (dynamic sequence axes become 16, see runtime.data).
"""
from __future__ import annotations

from collections import defaultdict

import onnx

from ..ops.registry import handler_for
from .coverage import coverage_line
from .coverage import stored as stored_coverage
from ..passes.inject import SiteSelection, inject
from ..runtime.data import fixed_batch, input_specs, synthetic
from ..runtime.session import InjectionSession


def inspect_model(model: onnx.ModelProto, selection: SiteSelection | None = None,
                  int_widths=(16, 32), provider: str = "cpu") -> dict:
    res = inject(model, selection, int_widths=int_widths)
    sess = InjectionSession(res.model, provider)
    specs = input_specs(model)
    feeds = synthetic(specs, fixed_batch(specs) or 1)
    plans = sess.plans(feeds)
    sites = []
    totals = defaultdict(lambda: {"sites": 0, "operations": 0, "bits": 0})
    for plan in plans:
        s = plan.site
        row = {"id": s.id, "node": s.node, "op_type": s.op_type, "origin": s.origin, "kind": s.kind,
               "format": s.format, "output_shape": list(plan.out_shape), "operations": plan.operations_per_item,
               "bits": plan.bits_per_item, "scale": s.scale}
        if s.kind == "gemm":
            row["gemm"] = {"M": int(plan.a_shape[-2]) if len(plan.a_shape) > 1 else 1,
                           "N": int(plan.b_shape[-1]) if len(plan.b_shape) > 1 else 1, "K": plan.k,
                           "batch": int(plan.elements // max(1, (plan.a_shape[-2] if len(plan.a_shape) > 1 else 1)
                                                          * (plan.b_shape[-1] if len(plan.b_shape) > 1 else 1)))}
        elif s.kind == "conv":
            row["conv"] = {"input": list(plan.a_shape), "weight": list(plan.b_shape), "K": plan.k,
                           "group": s.conv["group"]}
        sites.append(row)
        category = handler_for(s.op_type).category if handler_for(s.op_type) else "other"
        for key in (f"kind:{s.kind}", f"format:{s.format}", f"category:{category}", f"origin:{s.origin}"):
            totals[key]["sites"] += 1
            totals[key]["operations"] += plan.operations_per_item
            totals[key]["bits"] += plan.bits_per_item
    return {
        "sites": sites,
        "totals": {"sites": len(sites), "operations_per_item": sum(r["operations"] for r in sites),
                   "bits_per_item": sum(r["bits"] for r in sites)},
        "by": dict(totals),
        "skipped": [{"node": n, "reason": r} for n, r in res.skipped],
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [{"name": s.name, "shape": s.shape, "dtype": str(s.dtype.__name__)} for s in input_specs(model)],
        "coverage": stored_coverage(model),  # what ``harden`` protected (None for a model it did not write)
    }


def inspect_table(info: dict, limit: int | None = None) -> str:
    lines = [f"{'site':<6} {'kind':<11} {'fmt':<5} {'op':<10} {'from':<18} {'operations':>12}  shape  node"]
    rows = info["sites"] if limit is None else info["sites"][:limit]
    for r in rows:
        shape = ""
        if "gemm" in r:
            g = r["gemm"]
            shape = f"{g['batch']}x[{g['M']}x{g['K']}]@[{g['K']}x{g['N']}]"
        elif "conv" in r:
            shape = f"x{r['conv']['input']} w{r['conv']['weight']}"
        else:
            shape = "x".join(str(d) for d in r["output_shape"])
        lines.append(f"{r['id']:<6} {r['kind']:<11} {r['format']:<5} {r['op_type']:<10} {r['origin'][:18]:<18} "
                     f"{r['operations']:>12,}  {shape}  {r['node']}")
    if limit is not None and len(info["sites"]) > limit:
        lines.append(f"… {len(info['sites']) - limit} more sites (use --json for all)")
    t = info["totals"]
    lines.append(f"total: {t['sites']} sites, {t['operations_per_item']:,} operations and "
                 f"{t['bits_per_item']:,} result bits per item")
    for key, v in sorted(info["by"].items()):
        lines.append(f"  {key:<30} {v['sites']:>5} sites {v['operations']:>15,} operations")
    for s in info["skipped"]:
        lines.append(f"  skipped {s['node']}: {s['reason']}")
    if info.get("coverage"):
        lines.append("hardened by onnxft: " + coverage_line(info["coverage"]))
        for u in info["coverage"]["unprotected"][:10]:
            lines.append(f"  unprotected {u['op_type']} {u['name']}: {u['reason']}")
    return "\n".join(lines)
