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

Two hooks for raw detector heads (outputs before any decoding, as exported):

- ``yolo_sdc``: an Ultralytics YOLOv8 head ``[items, 4 + C, anchors]`` (cx, cy, w, h, then C class
  scores): the detections a user gets, decoded as NudeNet does (best class score >= 0.25,
  class-agnostic NMS at IoU 0.45), differ from the fault-free ones (one to one at IoU 0.5, same class);
- ``anchor_sdc``: a PicoDet / GFL head, per level a score output ``[items, anchors, C]`` (sigmoid
  scores) and a box-distribution output ``[items, anchors, 4 * (R + 1)]`` (logits over R + 1 bins of
  each side's distance): the candidates, (anchor, class) pairs scoring >= 0.5 (rapid_layout's
  default threshold), differ, or a candidate's box (its four decoded distances from its anchor
  centre, in strides) overlaps its fault-free box with IoU < 0.5. This is before NMS, which needs
  the image size the outputs do not carry: a changed candidate that NMS would have suppressed
  still counts, so it is a little stricter than the boxes a user sees.
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


YOLO_CONF, YOLO_NMS_IOU = 0.25, 0.45
ANCHOR_CONF = 0.5


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (highest score first)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        if len(order) == 1:
            break
        rest = order[1:]
        order = rest[iou_matrix(boxes[i:i + 1], boxes[rest])[0] <= iou]
    return np.asarray(keep, int)


def yolo_detections(head: np.ndarray, conf: float = YOLO_CONF, iou: float = YOLO_NMS_IOU):
    """``(boxes [n, 4] x1y1x2y2, classes [n])`` of one item's YOLOv8 head ``[4 + C, anchors]``."""
    head = np.nan_to_num(np.asarray(head, np.float64), nan=-1.0, posinf=1e30, neginf=-1e30)
    cx, cy, w, h = head[:4]
    scores = head[4:].max(axis=0)
    cls = head[4:].argmax(axis=0)
    sel = scores >= conf
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)[sel]
    keep = _nms(boxes, scores[sel], iou)
    return boxes[keep], cls[sel][keep]


def _matched_with_classes(fb, fc, cb, cc, iou: float = IOU) -> bool:
    # boxes of different classes never overlap once shifted apart by their class
    span = 4.0 * max(1.0, float(np.abs(np.concatenate([fb.ravel(), cb.ravel(), [1.0]])).max()))
    return boxes_match(fb + (fc * span)[:, None], cb + (cc * span)[:, None], iou)


def yolo_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """The ``--sdc onnxft.metrics.detection:yolo_sdc`` hook (see the module docstring)."""
    heads = [k for k, v in clean.items() if np.ndim(v) == 3]
    if len(heads) != 1:
        raise ValueError(f"yolo_sdc: check one output of shape [items, 4 + C, anchors] (checked: {', '.join(clean)})")
    name = heads[0]
    out = np.zeros(len(clean[name]), bool)
    for k in range(len(out)):
        fb, fc = yolo_detections(faulty[name][k])
        cb, cc = yolo_detections(clean[name][k])
        out[k] = not _matched_with_classes(fb, fc, cb, cc)
    return out


def _ltrb(logits: np.ndarray) -> np.ndarray:
    """Expected distances [n, 4] (in strides) from GFL distribution logits [n, 4 * (R + 1)]."""
    x = np.asarray(logits, np.float64).reshape(len(logits), 4, -1)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    return (p * np.arange(x.shape[-1])).sum(axis=-1)


def _ltrb_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given as distances (l, t, r, b) from the same centre, row by row."""
    inter = (np.minimum(a[:, 0], b[:, 0]) + np.minimum(a[:, 2], b[:, 2])) * \
            (np.minimum(a[:, 1], b[:, 1]) + np.minimum(a[:, 3], b[:, 3]))
    area = lambda r: (r[:, 0] + r[:, 2]) * (r[:, 1] + r[:, 3])  # noqa: E731
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, inter / union, 1.0), nan=0.0)


def anchor_levels(clean: dict) -> list[tuple[str, str]]:
    """``[(score output, distribution output)]`` per level: outputs paired by their anchor count,
    the score output being the one whose fault-free values all lie in [0, 1]."""
    by_count: dict = {}
    for k, v in clean.items():
        if np.ndim(v) == 3:
            by_count.setdefault(np.shape(v)[1], []).append(k)
    levels = []
    for names in by_count.values():
        if len(names) != 2:
            raise ValueError(f"anchor_sdc: outputs {names} do not pair up as one score and one box output per level")
        unit = [bool(np.all((clean[n] >= 0) & (clean[n] <= 1))) for n in names]
        if unit.count(True) != 1:
            raise ValueError(f"anchor_sdc: cannot tell the score output from the box output among {names}")
        s, d = (names[0], names[1]) if unit[0] else (names[1], names[0])
        if np.shape(clean[d])[-1] % 4:
            raise ValueError(f"anchor_sdc: box output {d} has {np.shape(clean[d])[-1]} entries per anchor, "
                             "not 4 * (R + 1)")
        levels.append((s, d))
    if not levels:
        raise ValueError(f"anchor_sdc: no [items, anchors, C] outputs among {', '.join(clean)}")
    return levels


def anchor_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """The ``--sdc onnxft.metrics.detection:anchor_sdc`` hook (see the module docstring)."""
    levels = anchor_levels(clean)
    n = len(next(iter(clean.values())))
    out = np.zeros(n, bool)
    for s, d in levels:
        for k in range(n):
            fs = np.nan_to_num(np.asarray(faulty[s][k], np.float64), nan=-1.0)
            cs = np.asarray(clean[s][k], np.float64)
            fkeep, ckeep = fs >= ANCHOR_CONF, cs >= ANCHOR_CONF
            if not np.array_equal(fkeep, ckeep):
                out[k] = True
                continue
            anchors = np.flatnonzero(ckeep.any(axis=1))
            if len(anchors):
                fd = np.nan_to_num(np.asarray(faulty[d][k][anchors], np.float64), nan=0.0, posinf=1e30, neginf=-1e30)
                out[k] |= bool((_ltrb_iou(_ltrb(fd), _ltrb(clean[d][k][anchors])) < IOU).any())
    return out
