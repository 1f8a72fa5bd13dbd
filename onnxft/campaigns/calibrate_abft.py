"""ABFT threshold calibration: run fault-free data through the checksum tests and record how close
each GEMM's checksum residual comes to its rounding bound.

The residual ratio of a row is ``|sum(Y row) - A row @ (B e)| / (|A row| @ |B| e)``: the quantity the
detection test compares with ``tau``. ``calibrate_abft`` returns, per GEMM, the largest ratio
seen and the threshold that follows from it:

    tau = min(max(CAL_MARGIN * max_ratio, CAL_FLOOR_ULPS * u), rounding bound)

(margin 4, floor 16 float32 unit roundoffs; for a serving precision other than fp32 the bound
itself, since these CPU sessions cannot show its rounding: ``passes.thresholds.calibrated_tau``;
docs/abft.md). The absolute underflow term ``eta`` of the test (``passes.thresholds.underflow_term``)
is not calibrated: the ratio is taken of the residual less ``eta`` (for a GEMM with static ``K``
and ``N``, where the plan's ``eta`` is the test's; otherwise of the whole residual), and the
hardened test keeps ``tau |A| @ |B| e + eta`` whatever tau calibration picks. Calibrate on items
that the equivalence check does not use (``campaigns.harden`` splits its data). The result is plain data; ``abft(model,
thresholds=...)`` consumes it. This step runs sessions; the pass never does.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from ..passes.abft import CAL_FLOOR_ULPS, CAL_MARGIN, abft
from ..passes.thresholds import DEFAULT_PRECISION, calibrated_tau
from ..runtime.session import make_session


def calibrate_abft(model: onnx.ModelProto, batches_of_feeds: Iterable[dict], gemms=None,
                   names: str | None = None, margin: float = CAL_MARGIN, provider: str = "cpu",
                   threads: int | None = None, precision: str = DEFAULT_PRECISION) -> dict:
    """``{gemm name: {"max_ratio", "tau", "tau_bound", "rows"}}`` over all batches; ``tau`` and
    ``tau_bound`` for the serving ``precision`` (``abft`` re-derives tau from ``max_ratio`` for the
    precision it is given)."""
    probe = abft(model, scheme="standard", gemms=gemms, names=names, unit_scale=True, precision=precision)
    plan = probe.details["gemms"]
    m = probe.model
    extra = []
    for g in plan:
        for key in ("residual", "scale"):
            extra.append(g[key])
            m.graph.output.append(helper.make_tensor_value_info(g[key], onnx.TensorProto.FLOAT, None))
    sess = make_session(m, provider, threads, level="basic")
    worst = {g["name"]: 0.0 for g in plan}
    # (the residual an underflow may leave is eta's, not tau's: a row of outputs that all underflow
    # would otherwise set max_ratio to 1; with a dynamic K or N the plan's eta is at a representative
    # size, possibly above the run's, so nothing is subtracted there)
    eta = {g["name"]: g["eta"] if g["K"] is not None and g["N"] is not None else 0.0 for g in plan}
    rows = {g["name"]: 0 for g in plan}
    for feeds in batches_of_feeds:
        outs = sess.run(extra, feeds)
        for i, g in enumerate(plan):
            d, scale = outs[2 * i], outs[2 * i + 1]
            unit = scale.astype(np.float64)  # unit_scale: scale = |A| @ |B| e exactly
            with np.errstate(divide="ignore", invalid="ignore"):
                excess = np.maximum(np.abs(d.astype(np.float64)) - eta[g["name"]], 0.0)
                ratio = np.where(unit > 0, excess / unit, 0.0)
            worst[g["name"]] = max(worst[g["name"]], float(np.max(ratio)) if ratio.size else 0.0)
            rows[g["name"]] += int(ratio.size)
    return {g["name"]: {"max_ratio": worst[g["name"]],
                        "tau": calibrated_tau(worst[g["name"]], g["tau_bound"], precision, margin, CAL_FLOOR_ULPS),
                        "tau_bound": g["tau_bound"], "rows": rows[g["name"]]}
            for g in plan}
