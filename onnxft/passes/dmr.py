"""DMR pass: duplicate-and-compare for cheap non-linear ops (LayerNormalization by default).

What it inserts, and why. LayerNorm computes two statistics from every element of a row, so one
fault in a subtraction or a square shifts or rescales the whole row, and the row usually stays
inside any range bound: range restriction cannot see it, and ABFT does not cover it. On the int8
sample ViT at BER 3e-5, with every GEMM protected and every output range-restricted, LayerNorm
faults still cost about 2 points of accuracy. A LayerNorm is cheap (its output is one row of a
GEMM's input), so computing it twice is the simplest exact check:

    Y = Op(X);  Y2 = Op(X)                      (the copy: same inputs, same attributes)
    Y' = If(any(NOT Equal(Y, Y2)), then = Op(X) once more, else = Y)

Fault-free, the two copies run the same kernel on the same inputs and agree bit for bit, so the
output is the original's exactly; NaN never equals itself, so a NaN is always caught. The copy is
the model's own computation done again, so it is a fault site like the original (as TMR's copies
are); the comparison and the ``If`` are protection nodes; the recompute inside the ``If`` is
recovery and, as for ABFT's recovery without ``--inject-protection``, is not faulted.

The output tail is ABFT's (an ``If`` returning an in-place scatter), so a clean run copies
nothing. Nodes with more than one used output (LayerNorm's optional Mean and InvStdDev) are
skipped with the reason.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterable

import onnx

from ..graph.checksums import Nodes, any_false
from ..graph.edit import default_opset, insert_after
from ..graph.roles import PROTECTION, set_role
from .abft import checked_output
from .result import PassResult

ALIASES = {"layernorm": "LayerNormalization", "softmax": "Softmax", "gelu": "Gelu"}
DEFAULT_OPS = ("LayerNormalization",)
MIN_OPSET = 13


class DmrError(ValueError):
    """A user-facing problem with the options or the model."""


@dataclass
class _Unit:
    name: str
    out: str


def op_types_from(names: Iterable[str]) -> tuple[str, ...]:
    """Op types from user names: aliases (layernorm, softmax, gelu) or ONNX op types."""
    return tuple(ALIASES.get(n.strip().lower(), n.strip()) for n in names if n.strip())


def duplicate(model: onnx.ModelProto, op_types: Iterable[str] = DEFAULT_OPS, names: str | None = None) -> PassResult:
    """Duplicate-and-compare every main-graph node of ``op_types`` (default domain) whose name
    matches the regex ``names`` (see the module docstring). ``details["nodes"]``: the protected
    node names; ``details["tensors"]``: their protected outputs."""
    op_types = tuple(op_types)
    if not op_types:
        raise DmrError("no op types to duplicate")
    opset = default_opset(model, 0)
    if opset < MIN_OPSET:
        raise DmrError(f"the model's opset is {opset}; duplication needs opset {MIN_OPSET} or later")
    pattern = None
    if names is not None:
        try:
            pattern = re.compile(names)
        except re.error as exc:
            raise DmrError(f"bad node name pattern {names!r}: {exc}") from None
    out = copy.deepcopy(model)
    g = out.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    result = PassResult(model=out)
    after: dict[int, list] = {}
    inits = []
    protected, tensors = [], []
    for idx, node in enumerate(g.node):
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or node.output[0]
        if pattern is not None and not pattern.search(label):
            continue
        if any(o in used for o in list(node.output)[1:]):
            result.skipped.append((label, "more than one output is used"))
            continue
        k = len(protected)
        prefix = f"onnxft.dmr.n{k:03d}"
        raw, copy_out = f"{prefix}/unchecked", f"{prefix}/copy"
        target = node.output[0]
        node.output[0] = raw
        main = Nodes(prefix, opset)
        twin = copy.deepcopy(node)
        twin.name = f"{prefix}/copy"
        del twin.output[:]
        twin.output.append(copy_out)  # the copy is the model's computation: no protection role
        ok = main.op("Equal", raw, copy_out)
        cond = any_false(main, ok)
        then_nb = Nodes(f"{prefix}/then", opset, branch=True)
        again = copy.deepcopy(twin)
        again.name = f"{prefix}/then/recompute"
        again.output[0] = f"{prefix}/then/recomputed"
        set_role(again, PROTECTION)
        then_nb.nodes.append(again)
        count = then_nb.op("Size", again.output[0])
        checked_output(main, then_nb, _Unit(label, target), raw, prefix, again.output[0], count, False, cond)
        after[idx] = [twin] + main.nodes
        inits.extend(main.initializers)
        protected.append(label)
        tensors.append(target)
        result.inserted.append(f"{label}: duplicated and compared ({len(main.nodes) + 1} nodes)")
    insert_after(g, after)
    g.initializer.extend(inits)
    if not protected and not result.skipped:
        result.skipped.append((",".join(op_types), "no such node in the main graph"))
    result.details = {"nodes": protected, "tensors": tensors, "op_types": list(op_types)}
    return result
