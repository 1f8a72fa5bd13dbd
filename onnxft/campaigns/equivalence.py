"""Fault-free equivalence of a hardened model with its original, measured on items that calibration
did not see, in sessions at onnxruntime's default optimisation level (as a server runs them).

``split_holdout`` cuts the calibration data in two: the first part calibrates (range bounds, ABFT
thresholds), the held-out tail only checks. ``check_equivalence`` reports the largest absolute and
relative differences, how many items change their top-1 and how many leave the calibrated ranges;
``harden`` refuses to write a model outside ``tolerance`` unless forced.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..graph.edit import with_outputs
from ..runtime.data import Dataset, fixed_batch, input_specs, synthetic
from ..runtime.session import make_session

HOLDOUT_FRACTION = 4  # the last quarter of the calibration items ...
HOLDOUT_MAX = 256  # ... at most 256 of them
DEFAULT_TOLERANCE = 1e-5  # largest |hardened - original| / max |original|, per output (a float32 model)
# A model that computes in a 16-bit float: onnxruntime rounds its intermediate tensors to that
# format, and a tensor that gains a reader (a checksum) may be rounded at another point of a fused
# kernel, so bit-identical outputs are not to be had. The default is then stated in units of the
# format: TOLERANCE_ULPS units in the last place at 1 (2^-10 for float16, 2^-7 for bfloat16),
# relative to each output's largest magnitude (docs/abft.md, "Fault-free equivalence").
TOLERANCE_ULPS = 4
_ULP_AT_ONE = {onnx.TensorProto.FLOAT16: ("float16", 2.0 ** -10),
               onnx.TensorProto.BFLOAT16: ("bfloat16", 2.0 ** -7)}
SERVER_LEVEL = "all"  # onnxruntime's default graph optimisation level (ORT_ENABLE_ALL)


class EquivalenceError(ValueError):
    """The hardened model changes fault-free outputs beyond the tolerance."""


def compute_format(model: onnx.ModelProto) -> int:
    """The narrowest float format the model computes in: FLOAT16 / BFLOAT16 when any weight,
    constant or cast of the main graph or its bodies is in it, else FLOAT."""
    from ..graph.edit import walk

    found = {t.data_type for t in model.graph.initializer}
    for _, n in walk(model.graph):
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                found.add(a.i)
            elif a.type == onnx.AttributeProto.TENSOR:
                found.add(a.t.data_type)
    narrow = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)
    return next((f for f in narrow if f in found), onnx.TensorProto.FLOAT)


def default_tolerance(model: onnx.ModelProto) -> tuple[float, str]:
    """``(tolerance, why)``: ``DEFAULT_TOLERANCE`` for a float32 model; ``TOLERANCE_ULPS`` units in
    the last place of the 16-bit format a model computes in (see ``TOLERANCE_ULPS``)."""
    fmt = compute_format(model)
    if fmt in _ULP_AT_ONE:
        name, ulp = _ULP_AT_ONE[fmt]
        return TOLERANCE_ULPS * ulp, f"{TOLERANCE_ULPS} {name} ulps (relative): the model computes in {name}"
    return DEFAULT_TOLERANCE, "float32 model"


def split_holdout(data: Dataset | None, batch: int | None = None) -> tuple[Dataset | None, Dataset | None]:
    """``(calibration items, held-out items)``: the held-out items are the last quarter (at most
    256, at least one batch of a fixed-batch model); ``(data, None)`` when there are too few items
    to split (fewer than two, or than two fixed batches)."""
    if data is None:
        return None, None
    unit = batch or 1
    n = len(data)
    if n < 2 * unit:
        return data, None
    h = min(max(n // HOLDOUT_FRACTION, unit), HOLDOUT_MAX, n - unit)
    h = max(unit, h - h % unit)
    return data.head(n - h), data.tail(h)


def _batches(model: onnx.ModelProto, data: Dataset | None, size: int = 32):
    fixed = fixed_batch(input_specs(model))
    if data is None:
        yield synthetic(input_specs(model), fixed or 8, 1)
        return
    size = fixed or size
    stop = len(data) - len(data) % size if fixed else len(data)
    for s in range(0, stop, size):
        yield data.batch(s, s + size)


def check_equivalence(original: onnx.ModelProto, hardened: onnx.ModelProto, data: Dataset | None,
                      ranges: list[dict] | None = None, level: str = SERVER_LEVEL, provider: str = "cpu") -> dict:
    """Run both models fault-free on ``data`` (synthetic items when None) in sessions at ``level``.

    Returns ``{"items", "level", "data", "max_abs_diff", "max_rel_diff", "bit_identical",
    "top1_changed", "out_of_range", "in_range_max_abs_diff", "in_range_max_rel_diff"}``:
    relative differences are per output, relative to its largest magnitude in the batch;
    ``top1_changed`` counts items whose argmax over the last axis changes in a float output of
    rank 2 or 3 (``[batch, classes]``, ``[batch, steps, classes]``; a detector's maps are not
    classes); ``out_of_range`` counts items for which some range-restricted tensor of
    the original model (``ranges``: the plan's entries) leaves its bounds, where range restriction
    changes the output by design; the ``in_range_`` figures leave those items out."""
    produced = {o for node in original.graph.node for o in node.output}
    ranges = [r for r in ranges or [] if r["tensor"] in produced]
    range_tensors = [r["tensor"] for r in ranges]
    # The original's outputs come from the model as it is: with its intermediate tensors as extra
    # outputs onnxruntime may round them differently (a float16 tensor then stays float16 where it
    # otherwise ran in float32 into a Cast), so those are read from a second session.
    a = make_session(original, provider, level=level)
    a_ranges = make_session(with_outputs(original, range_tensors), provider, level=level) if ranges else None
    b = make_session(hardened, provider, level=level)
    names = [o.name for o in original.graph.output]
    worst = {"all": [0.0, 0.0], "in_range": [0.0, 0.0]}  # [abs, rel]
    exact, n, top1, outside = True, 0, 0, 0
    for feeds in _batches(original, data):
        ra = a.run(names, feeds) + (a_ranges.run(range_tensors, feeds) if ranges else [])
        rb = b.run(names, feeds)
        items = len(next(iter(feeds.values())))
        out = np.zeros(items, bool)
        for r, v in zip(ranges, ra[len(names):]):
            lo, hi = r["bounds"]
            if v.ndim and v.shape[0] == items:
                out |= ((v < lo) | (v > hi) | np.isnan(v)).reshape(items, -1).any(1)
        outside += int(out.sum())
        changed = np.zeros(items, bool)
        for x, y in zip(ra[:len(names)], rb):
            exact &= bool(x.shape == y.shape and np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.floating)))
            if x.shape != y.shape or not np.issubdtype(x.dtype, np.floating):
                if not np.array_equal(x, y):
                    worst = {k: [float("inf")] * 2 for k in worst}
                continue
            if not x.size:
                continue
            d = np.abs(x.astype(np.float64) - y)
            d = np.where(np.isnan(x) & np.isnan(y), 0.0, np.where(np.isnan(d), np.inf, d))
            top = max(float(np.max(np.abs(np.nan_to_num(x)))), 1e-30)
            per_item = d.reshape(items, -1).max(1) if x.shape[0] == items else np.full(items, d.max())
            for key, mask in (("all", np.ones(items, bool)), ("in_range", ~out)):
                if mask.any():
                    m = float(per_item[mask].max())
                    worst[key] = [max(worst[key][0], m), max(worst[key][1], m / top)]
            if x.ndim in (2, 3) and x.shape[-1] > 1 and x.shape[0] == items:  # [batch, classes], [batch, steps, classes]
                changed |= (np.argmax(x, -1) != np.argmax(y, -1)).reshape(items, -1).any(1)
        top1 += int(changed.sum())
        n += items
    return {"items": n, "level": level, "data": "held-out calibration items" if data is not None else "synthetic items",
            "max_abs_diff": worst["all"][0], "max_rel_diff": worst["all"][1], "bit_identical": exact,
            "top1_changed": top1, "out_of_range": outside,
            "in_range_items": n - outside,
            "in_range_max_abs_diff": worst["in_range"][0], "in_range_max_rel_diff": worst["in_range"][1]}


def enforce(report: dict, tolerance: float, force: bool) -> None:
    """Raise ``EquivalenceError`` (one line) when the items that stay inside the calibrated ranges
    differ beyond ``tolerance`` (relative) and ``force`` is not set. (Items outside the ranges are
    clamped by design: counted and reported, not refused.)"""
    report["tolerance"] = tolerance
    report["within_tolerance"] = bool(report["in_range_max_rel_diff"] <= tolerance)
    report["forced"] = bool(force and not report["within_tolerance"])
    if not report["within_tolerance"] and not force:
        raise EquivalenceError(
            f"the hardened model differs from the original by {report['in_range_max_rel_diff']:.3g} (relative; max abs "
            f"{report['in_range_max_abs_diff']:.3g}) on {report['items'] - report['out_of_range']} {report['data']} "
            f"inside the calibrated ranges, at onnxruntime level '{report['level']}': above the tolerance "
            f"{tolerance:g} ({report['top1_changed']} top-1 changes); nothing written (--force writes it anyway)")
