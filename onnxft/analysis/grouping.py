"""Group an injection graph's fault sites into layers, modules and op types.

Layers come from node names, the scopes that exporters write:

- PyTorch (torch.onnx): a numbered child of a ModuleList/Sequential, ``name.N`` —
  ``/blocks/blocks.0/attn/...``, ``/encoder/layer.3/...``, ``/layers.1/...``, ``/h.0/...``,
  ``/layer2/layer2.0/conv1/...`` (the residual block ``layer2.0``). The outermost numbered scope
  wins, so ``/layer2/layer2.0/downsample/downsample.0`` is in ``layer2.0``.
- TensorFlow (tf2onnx, Keras): ``model/block_3/...``, ``encoder_layer_2/...`` (``_N`` only after
  block/layer/stage: Keras appends ``_N`` to every repeated layer name, ``dense_2``), and the Keras
  applications' ``conv2_block1_1_conv`` / ``block2a_expand_conv`` (layer ``conv2_block1`` /
  ``block2a``).

When no name gives a layer, the structural fallback cuts the graph at its residual joins (an
``Add`` of two computed tensors): each run of sites up to and including a join is one segment.
A graph without residual joins (a plain chain) is cut before each GEMM/Conv instead.

Sites outside every layer form their own groups: ``stem`` (before the first layer), ``head``
(after the last) and ``other`` (between layers).

Modules follow the seed paper. Transformers: ``MHA linear`` (q/k/v/qkv/proj MatMuls, QK^T,
attention@V, their bias adds and the score scaling), ``FF linear`` (fc1/fc2/mlp MatMuls and bias
adds), ``non-linear`` (Softmax, GELU, LayerNorm and their primitives). CNNs: ``Conv``, ``FC``
(MatMul/Gemm), ``non-linear`` (BatchNorm, activations, pooling primitives). Sites in neither —
patch embedding, classifier head, residual and position-embedding adds — are ``other``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from ..faults.sites import Site, SiteTable
from ..graph.edit import walk
from ..graph.roles import INPUT, role_of

_TORCH_LAYER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.\d+$")
_TF_LAYER = re.compile(r"^[A-Za-z0-9_]*(?:block|layer|stage)s?_\d+$", re.I)
_KERAS_APP_LAYER = re.compile(r"^((?:[a-z]+\d+_)?block\d+[a-z]?)_", re.I)

NONLINEAR_ORIGINS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "Gelu", "BatchNormalization", "Sigmoid", "HardSigmoid",
    "HardSwish", "Relu", "Erf", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Softplus", "Sin", "Cos",
    "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "GlobalAveragePool", "InstanceNormalization",
    "GroupNormalization", "RMSNormalization"})
_NONLINEAR_SCOPE = re.compile(r"^(act|activation|gelu|relu|silu|swish|intermediate_act_fn|softmax"
                              r"|.*norm.*|ln(_?\d+)?(_[a-z]+)?)$", re.I)
_MHA_SCOPE = re.compile(r"attn|attention|mha|qkv|^q_proj$|^k_proj$|^v_proj$|^out_proj$|^query$|^key$|^value$",
                        re.I)
_FF_SCOPE = re.compile(r"mlp|ffn|feed_?forward|^fc\d*$|^intermediate$|^output$|^c_fc$|^linear\d*$", re.I)

MHA, FF, NONLINEAR, OTHER, CONV, FC = "MHA linear", "FF linear", "non-linear", "other", "Conv", "FC"


def scope(site: Site) -> list[str]:
    """The name scopes of a site (its node name without the node's own last part)."""
    parts = [p for p in site.node.split("/") if p]
    return parts[:-1]


def layer_from_name(site: Site) -> str | None:
    """The layer a site's scopes name, or None (see the module docstring)."""
    parts = scope(site)
    for i, part in enumerate(parts):
        if _TORCH_LAYER.match(part) or _TF_LAYER.match(part):
            return part
        m = _KERAS_APP_LAYER.match(part)
        if m:
            return m.group(1)
    return None


@dataclass
class Group:
    """A named set of site indices (into the site table), in graph order."""

    name: str
    sites: list[int]


def _ordered_groups(labels: list[str | None], sites: list[int]) -> list[Group]:
    """Groups from per-site labels; unlabelled sites become stem / other / head by position."""
    labelled = [i for i, lab in enumerate(labels) if lab is not None]
    first, last = (labelled[0], labelled[-1]) if labelled else (len(labels), -1)
    groups: dict[str, list[int]] = {}
    for i, (lab, s) in enumerate(zip(labels, sites)):
        if lab is None:
            lab = "stem" if i < first else "head" if i > last else "other"
        groups.setdefault(lab, []).append(s)
    return [Group(k, v) for k, v in groups.items()]


def network_sites(table: SiteTable) -> list[int]:
    """Indices of the sites in the network's own computation (not input sites)."""
    return [i for i, s in enumerate(table.sites) if s.op_type != "Identity" or not s.node.startswith("onnxft.input/")]


def layers(table: SiteTable, model: onnx.ModelProto | None = None) -> list[Group]:
    """Layers by name; the structural fallback when no name gives one. ``model`` is the model the
    injection graph was built from (its residual joins are easiest to see before injection)."""
    idx = network_sites(table)
    labels = [layer_from_name(table.sites[i]) for i in idx]
    if any(lab is not None for lab in labels) or model is None:
        return _ordered_groups(labels, idx)
    return _ordered_groups(structural_layers(table, model, idx), idx)


def structural_layers(table: SiteTable, model: onnx.ModelProto, idx: list[int]) -> list[str | None]:
    """Segment labels cut at residual joins: ``segment.K`` for sites up to the K-th join (a join
    closes its segment); sites after the last join get None (the head)."""
    joins = residual_joins(model)
    if not joins:  # a plain chain (VGG-like): one segment per GEMM/Conv and the sites after it
        labels, k = [], -1
        for i in idx:
            k += table.sites[i].kind in ("gemm", "conv")
            labels.append(f"segment.{k}" if k >= 0 else None)
        return labels
    labels: list[str | None] = []
    k = 0
    for i in idx:
        s = table.sites[i]
        labels.append(f"segment.{k}")
        if s.op_type == "Add" and s.node in joins:
            k += 1
    return [lab if int(lab.split(".")[1]) < k else None for lab in labels]


def residual_joins(model: onnx.ModelProto) -> set[str]:
    """Names of ``Add`` nodes both of whose operands are computed from the graph's inputs."""
    g = model.graph
    nodes = [n for _, n in walk(g)]
    consts = {t.name for t in g.initializer}
    data = {vi.name for vi in g.input if vi.name not in consts and not vi.name.startswith("onnxft.")}
    # forward pass in graph order: a tensor is "data" if any input of its producer is data
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n.op_type == "Constant":
                continue
            if any(i in data for i in n.input) and not all(o in data for o in n.output):
                data.update(o for o in n.output if o)
                changed = True
    joins = set()
    for n in nodes:
        if n.op_type == "Add" and len(n.input) == 2 and all(i in data for i in n.input):
            joins.add(n.name)
    return joins


def is_transformer(table: SiteTable) -> bool:
    return any(s.origin == "Softmax" or any(_MHA_SCOPE.search(p) for p in scope(s))
               for s in table.sites)


def module_of(site: Site, transformer: bool) -> str:
    """The seed paper's module of a site (see the module docstring)."""
    parts = scope(site)
    if site.origin in NONLINEAR_ORIGINS or any(_NONLINEAR_SCOPE.match(p) for p in parts):
        return NONLINEAR
    gemm = site.kind in ("gemm", "conv")
    if transformer:
        if any(_MHA_SCOPE.search(p) for p in parts):
            return MHA
        if any(_FF_SCOPE.search(p) for p in parts):
            return FF
        return OTHER
    if site.kind == "conv":
        return CONV
    if gemm:
        return FC
    if site.origin == "Gemm":  # the bias add and alpha scaling of a decomposed Gemm
        return FC
    return OTHER


def modules(table: SiteTable) -> list[Group]:
    transformer = is_transformer(table)
    order = [MHA, FF, NONLINEAR, OTHER] if transformer else [CONV, FC, NONLINEAR, OTHER]
    groups: dict[str, list[int]] = {k: [] for k in order}
    for i in network_sites(table):
        groups[module_of(table.sites[i], transformer)].append(i)
    return [Group(k, v) for k, v in groups.items() if v]


def op_types(table: SiteTable) -> list[Group]:
    """One group per op type of the original model (a decomposed site counts as its fused op)."""
    groups: dict[str, list[int]] = {}
    for i in network_sites(table):
        groups.setdefault(table.sites[i].origin, []).append(i)
    return [Group(k, v) for k, v in groups.items()]


def input_sites(table: SiteTable) -> list[int]:
    return [i for i in range(len(table.sites)) if i not in set(network_sites(table))]


__all__ = ["Group", "layers", "modules", "op_types", "layer_from_name", "module_of", "residual_joins",
           "input_sites", "network_sites", "is_transformer", "INPUT", "role_of"]
