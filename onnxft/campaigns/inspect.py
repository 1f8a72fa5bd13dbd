"""``onnxft inspect``: the fault sites of a model, their operation counts and GEMM shapes.

Counts come from one fault-free run of the injection graph on one item: the first item of the
user's data, else synthetic inputs of the shapes the model fixes (``runtime.data.synthetic``), so
they hold for the shapes the model really runs at.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from ..ops.registry import handler_for
from .coverage import coverage_line
from .coverage import stored as stored_coverage
from ..passes.inject import SiteSelection, inject
from ..runtime.data import InputLayout, fixed_batch, input_specs, synthetic
from ..runtime.session import InjectionSession
from ..graph.edit import default_opset


def inspect_model(model: onnx.ModelProto, selection: SiteSelection | None = None,
                  int_widths=(16, 32), provider: str = "cpu", feeds: dict | None = None,
                  inputs: InputLayout | None = None) -> dict:
    """``feeds``: the inputs to count on (``api.example_feeds``); default: one synthetic item of the
    shapes the model and ``inputs`` fix."""
    specs = input_specs(model, inputs)
    feeds = feeds if feeds is not None else synthetic(specs, fixed_batch(specs) or 1)
    res = inject(model, selection, int_widths=int_widths)
    sess = InjectionSession(res.model, provider)
    plans = sess.plans(feeds)
    sites = []
    totals = defaultdict(lambda: {"sites": 0, "operations": 0, "bits": 0})
    for plan in plans:
        s = plan.site
        row = {"id": s.id, "node": s.node, "op_type": s.op_type, "origin": s.origin, "kind": s.kind,
               "format": s.format, "output_shape": list(plan.out_shape), "operations": plan.operations_per_item,
               "bits": plan.bits_per_item, "scale": s.scale}
        if plan.executions is not None:  # inside If/Loop/Scan: how often it ran (counts are summed)
            row["path"], row["executions"] = s.path, len(plan.executions)
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
        # every node that is not a site, with the reason (data movement, integer arithmetic, ...)
        "non_sites": res.details.get("non_sites", []),
        "opset": default_opset(model),
        "inputs": [{"name": s.name, "shape": s.shape, "dtype": str(s.dtype.__name__), "batch_axis": s.batch_axis,
                    "run_shape": list(np.shape(feeds[s.name])) if s.name in feeds else None} for s in specs],
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
        if "executions" in r:
            shape += f" ran {r['executions']}x"
        lines.append(f"{r['id']:<6} {r['kind']:<11} {r['format']:<5} {r['op_type']:<10} {r['origin'][:18]:<18} "
                     f"{r['operations']:>12,}  {shape}  {r['node']}")
    if limit is not None and len(info["sites"]) > limit:
        lines.append(f"… {len(info['sites']) - limit} more sites (use --json for all)")
    t = info["totals"]
    lines.append(f"total: {t['sites']} sites, {t['operations_per_item']:,} operations and "
                 f"{t['bits_per_item']:,} result bits per item")
    for key, v in sorted(info["by"].items()):
        lines.append(f"  {key:<30} {v['sites']:>5} sites {v['operations']:>15,} operations")
    rows = info.get("non_sites", [])
    if rows:
        by_reason: dict[str, list[str]] = {}
        for r in rows:
            by_reason.setdefault(r["reason"], []).append(r["node"])
        lines.append(f"not sites: {len(rows)} nodes (--json lists every one)")
        for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(nodes[:3]) + (f", … {len(nodes) - 3} more" if len(nodes) > 3 else "")
            lines.append(f"  {len(nodes):>5} {reason}: {shown}")
    listed = {r["node"] for r in rows}
    for s in info["skipped"]:
        if s["node"] not in listed:
            lines.append(f"  skipped {s['node']}: {s['reason']}")
    for i in info.get("inputs", []):
        axis = "no batch axis (fed whole)" if i["batch_axis"] is None else f"batch axis {i['batch_axis']}"
        run = "x".join(map(str, i["run_shape"])) if i.get("run_shape") is not None else "?"
        lines.append(f"  input {i['name']}: {i['dtype']}, counted at shape [{run}], {axis}")
    if info.get("coverage"):
        lines.append("hardened by onnxft: " + coverage_line(info["coverage"]))
        for u in info["coverage"]["unprotected"][:10]:
            lines.append(f"  unprotected {u['op_type']} {u['name']}: {u['reason']}")
    return "\n".join(lines)
