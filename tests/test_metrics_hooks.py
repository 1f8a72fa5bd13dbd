"""The shipped --sdc hooks for real models' natural criteria: greedy CTC strings, YOLOv8 and
PicoDet/GFL heads, binarised maps; each on hand-made outputs whose answer is known, and one in a
campaign where the batch axis of the output is axis 1 (a [T, batch, C] CTC output)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from onnxft.campaigns.outcomes import Judge, OutcomeOptions
from onnxft.metrics import ctc, detection, maps


def one_hot_steps(labels, classes=5):
    out = np.full((len(labels), classes), -5.0, np.float32)
    out[np.arange(len(labels)), labels] = 5.0
    return out


def test_greedy_ctc_collapses_repeats_and_drops_the_blank():
    # blank 0: 1 1 0 1 2 2 0 -> (1, 1, 2); blank last (4): 4 3 3 4 4 1 -> (3, 1)
    a = one_hot_steps([1, 1, 0, 1, 2, 2, 0])[None]
    assert ctc.greedy_decode(a, 0) == [(1, 1, 2)]
    b = one_hot_steps([4, 3, 3, 4, 4, 1])[None]
    assert ctc.greedy_decode(b, -1) == [(3, 1)]
    with pytest.raises(ValueError, match=r"\[items, T, C\]"):
        ctc.greedy_decode(np.zeros((2, 5)), 0)


def test_ctc_sdc_only_when_the_string_changes():
    clean = np.stack([one_hot_steps([1, 1, 0, 2]), one_hot_steps([3, 0, 0, 3]), one_hot_steps([1, 0, 0, 0])])
    faulty = clean.copy()
    faulty[0, 1] = one_hot_steps([0])[0]  # 1 0 0 2: same string (1, 2)
    faulty[0, 0, 1] = 50.0  # a larger score, same arg-max
    faulty[1, 1] = one_hot_steps([3])[0]  # 3 3 0 3: (3, 3) -> same
    faulty[2, 2] = one_hot_steps([4])[0]  # 1 0 4 0: (1, 4) -> SDC
    got = ctc.ctc_sdc({"p": faulty}, {"p": clean})
    np.testing.assert_array_equal(got, [False, False, True])
    # blank last (class 4): class 0 is a character. Item 2: 1 0 0 0 -> (1, 0) against 1 0 4 0 -> (1, 0, 0)
    np.testing.assert_array_equal(ctc.ctc_sdc_blank_last({"p": faulty}, {"p": clean}), [False, False, True])
    blank_step = clean.copy()
    blank_step[0, 3] = one_hot_steps([4])[0]  # blank 0: a new character 4; blank last: the 2 is dropped
    np.testing.assert_array_equal(ctc.ctc_sdc({"p": blank_step}, {"p": clean}), [True, False, False])
    np.testing.assert_array_equal(ctc.ctc_sdc_blank_last({"p": blank_step}, {"p": clean}), [True, False, False])


def test_ctc_hook_on_a_time_major_output_in_a_judge():
    """A [T, batch, C] output: the campaign's probe puts the batch first, the hook decodes per item."""
    clean_bt = np.stack([one_hot_steps([1, 0, 2]), one_hot_steps([2, 2, 0])])  # [batch, T, C]
    clean = np.moveaxis(clean_bt, 0, 1)  # [T, batch, C]
    faulty = clean.copy()
    faulty[1, 1] = one_hot_steps([3])[0]  # item 1: 2 3 0 -> (2, 3)
    j = Judge(["logits"], [clean], OutcomeOptions(sdc="onnxft.metrics.ctc:ctc_sdc"), items=2, axes={"logits": 1})
    np.testing.assert_array_equal(j.classify([faulty], [clean]), [0, 1])


def yolo_head(boxes, classes, scores, anchors=6, n_classes=3):
    """[4 + C, anchors]: the given boxes (cx, cy, w, h) first, the rest empty."""
    head = np.zeros((4 + n_classes, anchors), np.float32)
    for k, (b, c, s) in enumerate(zip(boxes, classes, scores)):
        head[:4, k] = b
        head[4 + c, k] = s
    return head


def test_yolo_decoding_nms_and_sdc():
    clean = yolo_head([(50, 50, 20, 20), (52, 51, 20, 20), (150, 150, 30, 30)], [0, 0, 2], [0.9, 0.6, 0.8])
    boxes, cls = detection.yolo_detections(clean)
    assert len(boxes) == 2 and sorted(cls.tolist()) == [0, 2]  # the overlapping 0.6 box suppressed
    moved_a_pixel = clean.copy()
    moved_a_pixel[0, 0] += 1.0
    low_score = clean.copy()
    low_score[4 + 2, 2] = 0.1  # the class-2 box falls under 0.25: lost
    other_class = clean.copy()
    other_class[4 + 2, 2], other_class[4 + 1, 2] = 0.0, 0.8
    nan_free_noise = clean.copy()
    nan_free_noise[4, 5] = 0.2  # a new candidate below the threshold
    f = np.stack([moved_a_pixel, low_score, other_class, nan_free_noise])
    c = np.stack([clean] * 4)
    np.testing.assert_array_equal(detection.yolo_sdc({"output0": f}, {"output0": c}), [False, True, True, False])


def gfl_outputs(score_rows, dist_rows, anchors=4, classes=3, bins=8):
    s = np.zeros((1, anchors, classes), np.float32)
    d = np.zeros((1, anchors, 4 * bins), np.float32)
    for (a, c, v) in score_rows:
        s[0, a, c] = v
    for a, dists in dist_rows:
        logits = np.full((4, bins), -10.0, np.float32)
        logits[np.arange(4), dists] = 10.0
        d[0, a] = logits.reshape(-1)
    return {"scores": s, "dist": d}


def test_anchor_head_pairs_levels_and_judges_candidates():
    clean = gfl_outputs([(1, 2, 0.9)], [(1, [2, 2, 2, 2])])
    assert detection.anchor_levels(clean) == [("scores", "dist")]
    same = gfl_outputs([(1, 2, 0.7)], [(1, [2, 2, 2, 2]), (3, [7, 7, 7, 7])])  # non-candidate anchor changed
    lost = gfl_outputs([(1, 2, 0.3)], [(1, [2, 2, 2, 2])])
    added = gfl_outputs([(1, 2, 0.9), (0, 0, 0.6)], [(1, [2, 2, 2, 2])])
    shrunk = gfl_outputs([(1, 2, 0.9)], [(1, [2, 2, 0, 0])])  # box 4x4 -> 2x2 strides: IoU 0.25
    grown_a_bit = gfl_outputs([(1, 2, 0.9)], [(1, [2, 2, 2, 3])])  # 4x4 -> 4x5: IoU 0.8
    for f, want in ((same, False), (lost, True), (added, True), (shrunk, True), (grown_a_bit, False)):
        assert detection.anchor_sdc(f, clean).tolist() == [want]


def test_binarised_map_hooks():
    clean = np.zeros((3, 1, 10, 10), np.float32)
    clean[:, :, 2:6, 2:6] = 0.9  # a 4 x 4 text region in every item
    f = clean.copy()
    f[0, 0, 9, 9] = 0.31  # one stray pixel: IoU 16/17 = 0.94 -> masked
    f[1, 0, 2:6, 2:4] = 0.1  # half the region lost -> SDC
    f[2] *= 0.5  # same map at half the strength: 0.45 > 0.3 -> masked for text
    np.testing.assert_array_equal(maps.text_map_sdc({"m": f}, {"m": clean}), [False, True, False])
    # focus: min-max normalised first, so half the strength is the same focus region
    g = clean.copy()
    g[1, 0, 5, 5] = 0.5  # normalised 0.55 < 0.8: a pixel leaves the region (IoU 15/16) -> masked
    g[2, 0, 0:2, 0:2] = 2.0  # a new hot spot: the old region falls under 0.8 x max -> SDC
    np.testing.assert_array_equal(maps.focus_sdc({"m": g}, {"m": clean}), [False, False, True])
    assert maps.mask_iou(np.zeros((1, 4), bool), np.zeros((1, 4), bool)).tolist() == [1.0]


def test_hooks_in_a_campaign_run_through_eval(tmp_path):
    """`eval --sdc onnxft.metrics.ctc:ctc_sdc_blank_last` on a [T, batch, C] model: the probe finds
    the batch on axis 1, BER 0 gives no SDC, and a high BER gives some."""
    import onnxft.api as ft
    from onnx import numpy_helper as nh

    w = np.random.default_rng(0).standard_normal((6, 4 * 5)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                      h.make_node("Reshape", ["m", "shape"], ["r"], name="rs"),
                      h.make_node("Transpose", ["r"], ["logits"], perm=[1, 0, 2], name="tr")],
                     "crnn", [h.make_tensor_value_info("x", T.FLOAT, ["n", 6])],
                     [h.make_tensor_value_info("logits", T.FLOAT, [4, "n", 5])],
                     [nh.from_array(w, "w"), nh.from_array(np.array([-1, 4, 5], np.int64), "shape")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "crnn.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32))
    r = ft.evaluate(str(tmp_path / "crnn.onnx"), str(tmp_path / "d.npz"), bers=[0.0, 3e-2], trials=2, metric="sdc",
                    sdc="onnxft.metrics.ctc:ctc_sdc_blank_last", batch=8)
    assert r.outputs["sdc_criterion"] == "onnxft.metrics.ctc:ctc_sdc_blank_last"
    zero, high = r.points
    assert zero.sdc == 0 and zero.due == 0
    assert high.sdc + high.due > 0
