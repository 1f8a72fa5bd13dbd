"""ABFT threshold calibration: run fault-free data through the checksum tests and record how close
each GEMM's checksum residual comes to its rounding bound.

The residual ratio of a row is ``|sum(Y row) - A row @ (B e)| / (|A row| @ |B| e)``: the quantity the
detection test compares with ``tau``. ``calibrate_abft`` returns, per GEMM, the largest ratio
seen and the threshold that follows from it:

    tau = min(max(CAL_MARGIN * max_ratio, CAL_FLOOR_ULPS * u), rigorous bound)

(margin 4, floor 16 unit roundoffs; docs/abft.md). The result is plain data; ``abft(model,
thresholds=...)`` consumes it. This step runs sessions; the pass never does.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from ..passes.abft import CAL_FLOOR_ULPS, CAL_MARGIN, UNIT_ROUNDOFF, abft
from ..runtime.session import make_session


def calibrate_abft(model: onnx.ModelProto, batches_of_feeds: Iterable[dict], gemms=None,
                   names: str | None = None, margin: float = CAL_MARGIN, provider: str = "cpu",
                   threads: int | None = None) -> dict:
    """``{gemm name: {"max_ratio", "tau", "tau_bound", "rows"}}`` over all batches."""
    probe = abft(model, scheme="standard", gemms=gemms, names=names, unit_scale=True)
    plan = probe.details["gemms"]
    m = probe.model
    extra = []
    for g in plan:
        for key in ("residual", "scale"):
            extra.append(g[key])
            m.graph.output.append(helper.make_tensor_value_info(g[key], onnx.TensorProto.FLOAT, None))
    sess = make_session(m, provider, threads, level="basic")
    worst = {g["name"]: 0.0 for g in plan}
    rows = {g["name"]: 0 for g in plan}
    for feeds in batches_of_feeds:
        outs = sess.run(extra, feeds)
        for i, g in enumerate(plan):
            d, scale = outs[2 * i], outs[2 * i + 1]
            unit = scale.astype(np.float64)  # unit_scale: scale = |A| @ |B| e exactly
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(unit > 0, np.abs(d.astype(np.float64)) / unit, 0.0)
            worst[g["name"]] = max(worst[g["name"]], float(np.max(ratio)) if ratio.size else 0.0)
            rows[g["name"]] += int(ratio.size)
    u = UNIT_ROUNDOFF[onnx.TensorProto.FLOAT]
    return {g["name"]: {"max_ratio": worst[g["name"]],
                        "tau": min(max(margin * worst[g["name"]], CAL_FLOOR_ULPS * u), g["tau_bound"]),
                        "tau_bound": g["tau_bound"], "rows": rows[g["name"]]}
            for g in plan}
