"""Shared options describing a model's inputs (``--shape``, ``--batch-axis``) and the fault budget
(``--max-faults``), parsed into ``runtime.data.InputLayout`` and a number."""
from __future__ import annotations

import math

import click

from ..faults.sampling import DEFAULT_MAX_FAULTS
from ..runtime.data import InputLayout


def parse_shapes(values) -> dict[str, tuple[int, ...]]:
    """``("ids:1,128", "x:1,3,224,224")`` -> ``{"ids": (1, 128), …}``; a scalar is ``NAME:`` (rank 0)."""
    out = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            shape = None
        if not sep or not name or shape is None or any(d < 1 for d in shape):
            raise click.BadParameter(f"{v!r}: expected NAME:D0,D1,… with positive integers", param_hint="--shape")
        if name in out:
            raise click.BadParameter(f"input {name!r} given twice", param_hint="--shape")
        out[name] = shape
    return out


def parse_batch_axes(values) -> dict[str, int | None]:
    """``("state:1", "sr:none")`` -> ``{"state": 1, "sr": None}`` (none: no batch axis, fed whole)."""
    out = {}
    for v in values:
        name, sep, axis = v.rpartition(":")
        axis = axis.strip().lower()
        try:
            value = None if axis == "none" else int(axis)
        except ValueError:
            value = "bad"
        if not sep or not name or value == "bad":
            raise click.BadParameter(f"{v!r}: expected NAME:AXIS (an integer, or none)", param_hint="--batch-axis")
        if name in out:
            raise click.BadParameter(f"input {name!r} given twice", param_hint="--batch-axis")
        out[name] = value
    return out


def input_layout(shapes=(), batch_axes=()) -> InputLayout:
    return InputLayout(parse_shapes(shapes), parse_batch_axes(batch_axes))


def parse_max_faults(text: str) -> float | None:
    """A positive number (``5e7``), or ``none`` for no limit."""
    if str(text).strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if math.isnan(v) or v <= 0:
        raise click.BadParameter(f"{text!r}: expected a positive number or none", param_hint="--max-faults")
    return v


def input_options(shapes: bool = True):
    """``--batch-axis`` (and ``--shape`` unless ``shapes=False``: verbs that always have data)."""
    def deco(f):
        f = click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME:AXIS",
                         help="Batch axis of an input (inferred: the axis named like the outputs' batch, else 0; "
                              "'none': fed whole with every batch). Repeatable.")(f)
        if shapes:
            f = click.option("--shape", "shapes", multiple=True, metavar="NAME:D0,D1,…",
                             help="Shape of an input when there is no --data (its batch axis takes --batch). "
                                  "Repeatable.")(f)
        return f
    return deco


def max_faults_option(f):
    return click.option("--max-faults", default=f"{DEFAULT_MAX_FAULTS:g}", show_default=True,
                        help="Refuse a BER whose expected flips per batch exceed this (about 600 bytes each); "
                             "'none': no limit.")(f)
