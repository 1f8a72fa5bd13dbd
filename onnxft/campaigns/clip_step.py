"""The clipped-activation step of ``harden`` (kept in its own module: harden calls it once).

Profiles and trains the thresholds (``train_clip``), inserts the clips (``passes.clip``), and
returns the plan entry. The range restriction that runs after it no longer restricts GELU or ReLU
outputs: the clip bounds them already (Softmax, LayerNorm & co. stay as asked).
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from ..passes.clip import MIN_OPSET, ClipError
from ..runtime.data import Dataset
from .train_clip import clip_thresholds
from ..graph.edit import default_opset

__all__ = ["apply_clip"]


def apply_clip(model: onnx.ModelProto, options, data: Dataset | None):
    """(clipped model, plan entry, options with GELU/ReLU left to the clip)."""
    clip = options.clip
    opset = default_opset(model, 0)
    if opset < MIN_OPSET:
        raise ClipError(f"the model's opset is {opset}; clipped activations need opset {MIN_OPSET} or later")
    if data is None:
        raise ClipError("--clip needs data to profile (and, except ranger, labelled data to train) the "
                        "thresholds: give --train D.npz")
    res = clip_thresholds(model, data, clip)
    r = res.report
    entry = {"method": clip.method, "mode": r["mode"], "thresholds": r["thresholds"], "bytes": r["bytes"],
             "layers": [{k: layer[k] for k in ("tensor", "kind", "shape", "count", "bytes", "min", "max")}
                        for layer in r["layers"]],
             "train_seconds": r["train_seconds"], "train_items": r["items"], "peak_rss_mb": r["peak_rss_mb"],
             "cache_bytes": r.get("cache_bytes", 0),
             "objective": r.get("objective"), "options": r["options"],
             "blocks": [{k: b[k] for k in ("block", "thresholds", "start_objective", "end_objective", "accepted",
                                           "seconds", "cache_bytes", "cut")} for b in r.get("blocks", [])]}
    kinds = tuple(k for k in options.range_kinds if k not in ("gelu", "relu"))
    options = replace(options, range_kinds=kinds, range_mode=options.range_mode if kinds else "none")
    return res.model, entry, options
