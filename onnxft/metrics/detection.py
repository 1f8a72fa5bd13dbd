"""SDC of an object detector: the boxes of a faulty run against the fault-free boxes, at IoU 0.5.

A worked ``--sdc`` hook (docs/outcomes.md)::

    onnxft eval detector.onnx --data images.npz --metric sdc --sdc onnxft.metrics.detection:box_sdc

``box_sdc(faulty, clean, labels)`` takes dicts of the checked outputs (name -> array, items on
axis 0). Boxes: the output named ``boxes``, else the only checked output whose last axis has 4
entries, ``[items, N, 4]`` as (x1, y1, x2, y2). Scores: the output named ``scores`` ``[items, N]``,
when checked; a box counts when its score is at least ``SCORE_THRESHOLD`` (without scores every
box counts). An item is SDC unless its kept faulty boxes and kept fault-free boxes pair up one to
one with IoU >= ``IOU`` (greedy, best IoU first) — a lost, added or moved box is an SDC. A model
whose outputs are named otherwise wraps ``detection_sdc`` in a three-line function of its own.
"""
from __future__ import annotations

import numpy as np

IOU = 0.5
SCORE_THRESHOLD = 0.5


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4] (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: np.clip(r[:, 2] - r[:, 0], 0, None) * np.clip(r[:, 3] - r[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return np.nan_to_num(out, nan=0.0)


def boxes_match(faulty: np.ndarray, clean: np.ndarray, iou: float = IOU) -> bool:
    """True when the two box sets pair up one to one with IoU >= ``iou`` (greedy, best first)."""
    if len(faulty) != len(clean):
        return False
    if len(clean) == 0:
        return True
    m = iou_matrix(faulty, clean)
    for _ in range(len(clean)):
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < iou:
            return False
        m[i, :] = -1.0
        m[:, j] = -1.0
    return True


def detection_sdc(faulty_boxes, clean_boxes, faulty_scores=None, clean_scores=None, iou: float = IOU,
                  score_threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """Per item: True (SDC) unless the kept boxes match at ``iou`` (see the module docstring)."""
    out = np.zeros(len(clean_boxes), bool)
    for k in range(len(clean_boxes)):
        fb, cb = np.asarray(faulty_boxes[k]).reshape(-1, 4), np.asarray(clean_boxes[k]).reshape(-1, 4)
        if clean_scores is not None:
            fb = fb[np.asarray(faulty_scores[k]).reshape(-1) >= score_threshold]
            cb = cb[np.asarray(clean_scores[k]).reshape(-1) >= score_threshold]
        out[k] = not boxes_match(fb, cb, iou)
    return out


def box_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """The ``--sdc onnxft.metrics.detection:box_sdc`` hook (see the module docstring)."""
    name = "boxes" if "boxes" in clean else None
    if name is None:
        candidates = [k for k, v in clean.items() if np.ndim(v) >= 2 and np.shape(v)[-1] == 4]
        if len(candidates) != 1:
            raise ValueError("box_sdc: name the boxes output 'boxes' or check one output of shape [items, N, 4] "
                             f"(checked: {', '.join(clean)})")
        name = candidates[0]
    scores = "scores" if "scores" in clean else None
    return detection_sdc(faulty[name], clean[name], faulty.get(scores), clean.get(scores))
