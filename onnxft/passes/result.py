"""What every pass returns: the new model and an account of what it did."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class PassResult:
    """A pass's output. ``inserted`` and ``skipped`` are human-readable records.

    ``inserted``: one entry per rewrite the pass made (e.g. ``"Softmax /blocks.0/Softmax -> 5 nodes"``).
    ``skipped``: ``(node_name, reason)`` for every candidate the pass looked at and left alone.
    ``details``: plain data a later step needs (e.g. the ABFT plan: block sizes, thresholds, costs).
    Passes never mutate the caller's model: ``model`` is always a new object.
    """

    model: onnx.ModelProto
    inserted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)
