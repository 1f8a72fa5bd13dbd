"""SDC of a CTC text recogniser: the greedy-decoded string of a faulty run differs from the
fault-free one.

    onnxft eval rec.onnx --data lines.npz --metric sdc --sdc onnxft.metrics.ctc:ctc_sdc

A CTC recogniser outputs per-step class scores (logits or probabilities); its user reads the
string that greedy decoding gives: the arg-max class of every time step, repeats collapsed, blanks
dropped. Two outputs that decode to the same string are the same answer whatever their scores.

The hook takes each checked output as ``[items, T, C]``: the campaign moves the batch axis found
by its one-item/two-item probe to the front, so a ``[T, batch, C]`` output (PyTorch's CTC layout,
e.g. captcha_crnn's ``[20, B, 37]``) reaches the hook as ``[B, 20, 37]``. Which class is the
blank depends on the training code:

- ``ctc_sdc``: blank is class 0 (PaddleOCR's ``CTCLabelDecode``, PyTorch's ``nn.CTCLoss`` default;
  PP-OCR recognisers);
- ``ctc_sdc_blank_last``: blank is the last class, C - 1 (Keras' ``ctc_batch_cost``, and
  captcha-whisperer's CRNN: 36 of 37).
"""
from __future__ import annotations

import numpy as np


def greedy_decode(scores: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Label sequence of each item of ``scores`` ``[items, T, C]``: per-step arg-max, repeats
    collapsed, ``blank`` dropped (``blank`` may be negative: counted from the last class)."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"CTC decoding needs [items, T, C] scores, got shape {list(scores.shape)}")
    blank = blank % scores.shape[-1]
    best = np.argmax(scores, axis=-1)  # [items, T]
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(c) for c in row[keep] if c != blank))
    return out


def decoded_sdc(faulty: dict, clean: dict, blank: int) -> np.ndarray:
    """Per item: True when the decoded string of any checked output differs."""
    n = len(next(iter(clean.values())))
    sdc = np.zeros(n, bool)
    for name, c in clean.items():
        f = greedy_decode(faulty[name], blank)
        sdc |= np.array([a != b for a, b in zip(f, greedy_decode(c, blank))], bool)
    return sdc


def ctc_sdc(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """``--sdc onnxft.metrics.ctc:ctc_sdc``: greedy CTC strings differ (blank = class 0)."""
    return decoded_sdc(faulty, clean, 0)


def ctc_sdc_blank_last(faulty: dict, clean: dict, labels=None) -> np.ndarray:
    """``--sdc onnxft.metrics.ctc:ctc_sdc_blank_last``: greedy CTC strings differ (blank = last class)."""
    return decoded_sdc(faulty, clean, -1)
