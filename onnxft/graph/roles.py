"""Node roles: what a node inserted by an onnxft pass is for, stored in the node's metadata.

The inject pass reads roles to decide what it may fault:

- ``protection``: checksum, comparison, recovery and range-restriction nodes inserted by ``harden``.
  They are not fault sites unless the selection asks for them (``--inject-protection``), because
  ``eval HARDENED`` measures faults in the model's own computation by default.
- ``input``: an ``Identity`` placed after a graph input so that the input's values are a fault
  site of their own (patch-wise analysis faults input values).
"""
from __future__ import annotations

import onnx

ROLE_KEY = "onnxft.role"
PROTECTION = "protection"
INPUT = "input"


def role_of(node: onnx.NodeProto) -> str | None:
    return meta_of(node, ROLE_KEY)


def set_role(node: onnx.NodeProto, role: str) -> onnx.NodeProto:
    return set_meta(node, ROLE_KEY, role)


# Recovery metadata, read by ``inject`` under ``--inject-protection`` to make ABFT recovery a
# fault site (docs/abft.md, "Composition with injection"). Plain metadata: a hardened model runs
# without onnxft and these keys change nothing it computes.
RECOVERY_KEY = "onnxft.recovery"  # on an ABFT If: JSON {unit, op_type, a, b, bias, output}
RECOMPUTE_KEY = "onnxft.recompute"  # on a then-branch node computing recomputed values: JSON {index, target}


def meta_of(node: onnx.NodeProto, key: str) -> str | None:
    for p in node.metadata_props:
        if p.key == key:
            return p.value
    return None


def set_meta(node: onnx.NodeProto, key: str, value: str) -> onnx.NodeProto:
    for p in node.metadata_props:
        if p.key == key:
            p.value = value
            return node
    node.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return node
