"""Calibration for range restriction: the minimum and maximum of chosen tensors over a data set.

Kept apart from the pass (``onnxft.passes.ranges``) so that the pass never runs a session: this
step runs the model once per batch, with the tensors as extra graph outputs, and returns plain data
(``{tensor: (min, max)}``, JSON-ready) that ``site_bounds`` / ``restrict_ranges`` consume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx

from ..graph.edit import with_outputs
from ..runtime.data import Dataset
from ..runtime.session import make_session

__all__ = ["calibrate_ranges", "dataset_batches", "CalibrationError"]


class CalibrationError(ValueError):
    """A user-facing problem with the calibration request (one clear line)."""


def dataset_batches(dataset: Dataset, batch_size: int = 64, limit: int | None = None) -> Iterator[dict]:
    """Feeds of ``batch_size`` items from ``dataset`` (the first ``limit`` items if given)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield dataset.batch(start, min(start + batch_size, n))


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    have = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    missing = [t for t in tensors if t not in produced and t not in have]
    if missing:
        raise CalibrationError(f"tensor {missing[0]!r} is not produced by any node of the model")
    return with_outputs(model, tensors)


def calibrate_ranges(model: onnx.ModelProto | str | Path, batches_of_feeds: Iterable[Mapping[str, np.ndarray]],
                     tensors: Iterable[str], provider: str = "cpu",
                     threads: int | None = None) -> dict[str, tuple[float, float]]:
    """``{tensor: (min, max)}`` of each tensor over all batches (batches are streamed, never held).

    NaN and +-Inf values are left out of the range; a tensor with no finite value at all is an
    error, since no bound can be derived from it.
    """
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        return {}
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    sess = make_session(_with_outputs(model, tensors), provider=provider, threads=threads)
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    seen = 0
    for feeds in batches_of_feeds:
        values = sess.run(tensors, dict(feeds))
        seen += 1
        for t, v in zip(tensors, values):
            v = np.asarray(v)
            finite = v[np.isfinite(v)] if not np.isfinite(v).all() else v
            if finite.size:
                lo[t] = min(lo[t], float(finite.min()))
                hi[t] = max(hi[t], float(finite.max()))
    if not seen:
        raise CalibrationError("no calibration batches were given")
    empty = [t for t in tensors if lo[t] > hi[t]]
    if empty:
        raise CalibrationError(f"tensor {empty[0]!r} had no finite value on the calibration data")
    return {t: (lo[t], hi[t]) for t in tensors}
