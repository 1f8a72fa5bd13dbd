"""One table of per-op-type handlers: which ops are fault sites, of which kind and category.

``inspect``, ``inject`` and (later) ``harden`` all read this table, so adding an op type here is
the one place that teaches onnxft about it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpHandler:
    """How onnxft treats one op type.

    kind: ``gemm`` (products and partial sums are sites, see docs/fault_model.md), ``conv``
    (same, over a convolution window), ``elementwise`` (one operation per output element).
    category: coarse grouping used by reports (``linear``, ``elementwise``, ``nonlinear``).
    """

    op_type: str
    kind: str
    category: str


def _table() -> dict[str, OpHandler]:
    rows = [OpHandler("MatMul", "gemm", "linear"), OpHandler("Conv", "conv", "linear"),
            OpHandler("ConvTranspose", "conv", "linear")]
    rows += [OpHandler(t, "elementwise", "elementwise") for t in ("Add", "Sub", "Mul", "Div")]
    nonlinear = (
        "Exp", "Log", "Erf", "Tanh", "Sqrt", "Reciprocal", "Pow", "Sin", "Cos",
        "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "Softplus",
    )
    rows += [OpHandler(t, "elementwise", "nonlinear") for t in nonlinear]
    return {r.op_type: r for r in rows}


HANDLERS: dict[str, OpHandler] = _table()
# The Identity that passes.input_sites puts after a graph input (role "input"): its result is the
# stored input value, faulted like an elementwise result.
INPUT_HANDLER = OpHandler("Identity", "elementwise", "input")


def handler_for(op_type: str) -> OpHandler | None:
    return HANDLERS.get(op_type)
