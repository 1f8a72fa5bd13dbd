"""Inject pass: turn a model into an injection graph whose every arithmetic site can be faulted.

What it inserts, and why:

1. The model is upgraded to default-domain opset 26 (``BitCast`` flips bit patterns) and fused
   non-linear ops and Gemm are decomposed into primitives (``decompose``), so that the multiplies
   and adds inside Softmax, LayerNorm, GELU… are sites of their own.
2. Every selected site node ``N`` is replaced by ``If(has_faults)``: the else branch is ``N``
   alone (the fault-free path costs one ``If``, about 3 µs on CPU, and no copy); the then branch
   is ``N`` followed by an ``ai.onnxft`` fault operator (``FlipBits_*``, ``GemmFaults_*``,
   ``ConvFaults_*``; see ``custom_ops``) that applies the faults exactly.
3. Each site gets graph inputs ``onnxft.<site>.faults`` (an int64 fault table, see
   ``faults.sites``) and, for gemm/conv, operand offset vectors. They default to empty
   initializers, so the graph runs fault-free when they are not fed.
4. One extra output ``onnxft.shapes`` concatenates the shapes of every site's output and operands;
   the sampler reads it from a fault-free run to know how many operations each site does.
5. The site table is stored as metadata ``onnxft.sites`` (and the model's original opset as
   ``onnxft.source_opset``).
5b. With ``SiteSelection(include_protection=True)``, every ABFT unit's recovery (the recompute in
   the then branch of its ``If``) is a virtual site, sampled as a full recompute of the unit and
   applied to the elements a run actually recomputes (``_recovery_site``, ``_recovery_nodes``).
5c. Main-graph nodes that compute only from constants (in-graph weight dequantisation and the
   like: ``graph.constants``) are not sites: a runtime folds them once at load, so they are no
   per-inference arithmetic. ``SiteSelection(fault_constants=True)`` makes them sites.
6. With ``fault_free_path=True`` (campaigns), the whole graph sits behind ``If(any fault table
   has rows, or probe)`` whose else branch is the original model's nodes: a run without faults
   costs the original model plus a dozen tiny nodes.

The pass is pure: it returns a new model in a ``PassResult`` and never runs a session.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from ..custom_ops import FAULT_DOMAIN, FAULT_DOMAIN_VERSION, OPSET, all_functions
from ..custom_ops.functions import op_name
from ..graph.constants import load_time_nodes
from ..graph.edit import default_opset, walk
from ..graph.roles import INPUT, PROTECTION, RECOMPUTE_KEY, RECOVERY_KEY, meta_of, role_of, set_meta
from ..faults.sites import PROBE_INPUT, SHAPES_OUTPUT, SITES_KEY, SOURCE_OPSET_KEY, Site, SiteTable
from ..ops.registry import INPUT_HANDLER, handler_for
from ..runtime.model_io import external_data_dir
from .decompose import ORIGIN_KEY, ORIGIN_NODE_KEY, constant_value, decompose
from .non_sites import CONSTANT, INTEGER, NOT_SELECTED, non_sites, why_no_sites
from .non_sites import PROTECTION as PROTECTION_REASON
from .result import PassResult

FORMATS = ("fp32", "fp16", "int8")
_TWO_GB = 2**31 - 1
_DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
                TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}
_INTEGER_TYPES = (TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL)
_ELEMENT_BITS = {"float32": 32, "float16": 16, "int8": 8, "uint8": 8}


class InjectError(ValueError):
    """A user-facing problem with the model or the site selection."""


@dataclass(frozen=True)
class SiteSelection:
    """Which nodes become fault sites.

    op_types: op types to fault (default: every type in the registry). ``names``: regular
    expression searched in the node name (and in the fused op's name for decomposed nodes).
    formats: subset of ``fp32``, ``fp16``, ``int8``. ``scales``: ``(regex, scale)`` pairs; the
    last matching pattern sets a site's BER scale (0 = perfectly protected).
    ``include_protection``: nodes that ``harden`` inserted (checksums, comparisons, clips) are not
    sites unless this is set; with it, each ABFT unit's recovery recompute is a site too (a virtual
    one, see ``_recovery_site``). Other nodes inside ``If`` branches are never sites.
    ``fault_constants``: main-graph nodes that compute only from constants (weight dequantisation
    and the like, ``graph.constants``) run once, when a runtime folds them at load, not per
    inference: they are not sites unless this is set (docs/fault_model.md).
    """

    op_types: frozenset[str] | None = None
    names: str | None = None
    formats: frozenset[str] | None = None
    scales: tuple[tuple[str, float], ...] = ()
    include_protection: bool = False  # also fault nodes that harden inserted (role "protection")
    fault_constants: bool = False  # also fault arithmetic on constants only (folded at load)

    def scale_for(self, label: str) -> float:
        scale = 1.0
        for pattern, value in self.scales:
            if re.search(pattern, label):
                scale = value
        return scale


@dataclass
class _Graph:
    """Lookup tables over the main graph, built once."""

    model: onnx.ModelProto
    producers: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    inits: dict = field(default_factory=dict)
    types: dict = field(default_factory=dict)  # tensor -> (elem_type, rank or None)
    claimed_quantizers: set = field(default_factory=set)  # QuantizeLinear outputs already a site's
    reasons: dict = field(default_factory=dict)  # first output -> why that candidate is not a site
    covered: set = field(default_factory=set)  # first outputs of the nodes that are (or a site wraps)
    load_time: set = field(default_factory=set)  # first outputs of the nodes folded at load (graph.constants)

    def __post_init__(self):
        g = self.model.graph
        for n in g.node:
            for o in n.output:
                self.producers[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in g.initializer}
        self.load_time = load_time_nodes(g)
        for v in list(g.input) + list(g.output) + list(g.value_info):
            t = v.type.tensor_type
            rank = len(t.shape.dim) if t.HasField("shape") else None
            self.types[v.name] = (t.elem_type, rank)
        for name, t in self.inits.items():
            self.types[name] = (t.data_type, len(t.dims))
        for sub in _subgraphs_of(g):  # tensors inside If/Loop/Scan bodies (names are unique)
            for v in list(sub.input) + list(sub.output) + list(sub.value_info):
                if v.name not in self.types and v.type.HasField("tensor_type"):
                    t = v.type.tensor_type
                    self.types[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)

    def const_value(self, name: str):
        return constant_value(name, self.inits, self.producers, external_data_dir(self.model))


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upgrade to opset 26 and run shape inference; raises InjectError with one clear line."""
    model = copy.deepcopy(model)
    opset = default_opset(model)
    if opset is None:
        raise InjectError("the model imports no default ONNX opset")
    if model.ByteSize() > _TWO_GB:
        raise InjectError("the model is over 2 GB in memory: load it from its file with "
                          "onnxft.runtime.model_io.load_model (or pass the path), which keeps the weights on disk")
    if model.ir_version < 4:
        # Before IR 4 initializers are constants that must also be listed as graph inputs; the
        # version converter rejects them when they are not, and later IRs would read the listed
        # ones as overridable inputs (so BatchNorm and Gemm could not be folded). Drop the listing.
        inits = {t.name for t in model.graph.initializer}
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = 4
    if opset < OPSET:
        # The converter drops node metadata (roles, origins, the recovery marks inside If branches):
        # carry it over by (graph name, node name).
        meta = {(gr.name, n.name): list(n.metadata_props) for gr, n in walk(model.graph)
                if n.name and n.metadata_props}
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise InjectError(f"cannot upgrade the model from opset {opset} to {OPSET}: "
                              f"{str(exc).splitlines()[0]}") from None
        for gr, n in walk(model.graph):
            if (gr.name, n.name) in meta and not n.metadata_props:
                n.metadata_props.extend(meta[(gr.name, n.name)])
    # The version converter stamps the newest IR; onnxruntime 1.31 reads IR <= 13, enough for opset 26.
    model.ir_version = max(min(model.ir_version, 13), 10)
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise InjectError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    return model


def _origin(node: onnx.NodeProto) -> tuple[str, str]:
    props = {p.key: p.value for p in node.metadata_props}
    return props.get(ORIGIN_KEY, node.op_type), props.get(ORIGIN_NODE_KEY, node.name)


def _dq_source(g: _Graph, tensor: str):
    """If ``tensor`` is DequantizeLinear(q, scale, zero) of an 8-bit tensor, return its parts."""
    n = g.producers.get(tensor)
    if n is None or n.op_type != "DequantizeLinear":
        return None
    q = n.input[0]
    qtype = g.types.get(q, (None, None))[0]
    if qtype not in (TensorProto.INT8, TensorProto.UINT8):
        return None
    zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
    return {"q": q, "scale": n.input[1], "zero": zero, "qtype": qtype}


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _find_sites(g: _Graph, sel: SiteSelection, int_widths, result: PassResult):
    """Mark first: decide which nodes are sites and describe them. Nothing is built here.

    Returns ``(sites, nested)``: ``sites`` lists ``(site, node to wrap, extra)`` in id order;
    ``nested`` maps the location of each site inside control flow (``_find_nested``) to
    ``(site, extra)``."""
    sites: list[tuple[Site, onnx.NodeProto, dict]] = []
    order: list[tuple] = []
    nested: dict[tuple, tuple] = {}
    position = {id(n): i for i, n in enumerate(g.model.graph.node)}
    for pos, node in enumerate(g.model.graph.node):
        if node.op_type == "If" and sel.include_protection and meta_of(node, RECOVERY_KEY) is not None:
            found = _recovery_site(g, node, sel, int_widths, result)
        else:
            found = _node_site(g, node, sel, int_widths, result)
            if found is None and _has_subgraphs(node) and role_of(node) != PROTECTION:
                for loc, (site, wrapped, extra) in _find_nested(g, node, (pos,), "", sel, int_widths, result):
                    if sel.formats is not None and site.format not in sel.formats:
                        continue
                    site.scale = sel.scale_for(site.node + " " + site.origin_node)
                    g.covered.add(wrapped.output[0])
                    nested[loc] = (site, extra)
                    sites.append((site, wrapped, extra))
                    order.append(loc)
        if found is None:
            continue
        site, wrapped, extra = found
        if sel.formats is not None and site.format not in sel.formats:
            g.reasons[node.output[0]] = NOT_SELECTED
            continue
        g.covered.update((node.output[0], wrapped.output[0]))
        site.scale = sel.scale_for(site.node + " " + site.origin_node)
        sites.append((site, wrapped, extra))
        # Ids in the order of the nodes the sites wrap, which is the order their shape vectors are
        # emitted in: a quantized result can be wrapped some nodes after its op (past a range check
        # or DMR's output tail), with other sites in between.
        order.append((position[id(wrapped)],))
    ranked = sorted(range(len(sites)), key=lambda i: order[i])
    sites = [sites[i] for i in ranked]
    for i, (site, _, _) in enumerate(sites):
        site.id = f"s{i:04d}"
    return sites, nested


_BRANCH_LABELS = {"then_branch": "then", "else_branch": "else", "body": "body"}


def _has_subgraphs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraphs_of(graph: onnx.GraphProto):
    for _, n in walk(graph):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g


def _find_nested(g: _Graph, node: onnx.NodeProto, loc: tuple, path: str, sel: SiteSelection, int_widths,
                 result: PassResult):
    """Sites inside the If branches or Loop/Scan body of ``node``, at any depth: yields
    ``(location, (site, node, extra))``, the location being ``loc`` followed by (branch attribute,
    node position) pairs. ``Site.path`` names the way there, e.g. ``If_0/then/Loop_2/body``."""
    if node.op_type not in ("If", "Loop", "Scan") or node.domain not in ("", "ai.onnx"):
        result.skipped.append((node.name or node.op_type, f"subgraphs of {node.op_type} are not searched for sites"))
        return
    for a in node.attribute:
        if a.type != onnx.AttributeProto.GRAPH:
            continue
        inner = f"{path}{node.name or node.op_type}/{_BRANCH_LABELS[a.name]}"
        for i, n in enumerate(a.g.node):
            where = loc + (a.name, i)
            if n.op_type == "If" and meta_of(n, RECOVERY_KEY) is not None:
                continue  # an ABFT unit's recovery: protection, never nested sites
            found = _node_site(g, n, sel, int_widths, result)
            if found is not None:
                site, wrapped, extra = found
                if wrapped is not n:  # a QDQ result wrapped at its quantizer: main graph only
                    result.skipped.append((site.node, "a quantized result inside control flow is not a site yet"))
                    continue
                site.node = f"{inner}/{site.node}"
                site.path = inner
                yield where, (site, wrapped, extra)
            elif _has_subgraphs(n) and role_of(n) != PROTECTION:
                if node.op_type == "Scan":  # its state variables cannot count varying executions
                    result.skipped.append((n.name or n.op_type, "control flow inside a Scan body is not "
                                           "searched for sites (sites directly in the body are)"))
                    continue
                yield from _find_nested(g, n, where, inner + "/", sel, int_widths, result)


def _selected(sel: SiteSelection, op_type: str, origin: str, label: str, origin_node: str) -> bool:
    if sel.op_types is not None and op_type not in sel.op_types and origin not in sel.op_types:
        return False
    return sel.names is None or bool(re.search(sel.names, label) or re.search(sel.names, origin_node))


def _node_site(g: _Graph, node: onnx.NodeProto, sel: SiteSelection, int_widths, result: PassResult):
    """(site, node to wrap, extra) when ``node`` is a selected fault site, else None."""
    handler = handler_for(node.op_type)
    if role_of(node) == INPUT:  # an input's values (passes.input_sites): one elementwise site
        handler = INPUT_HANDLER
    if handler is None or node.domain not in ("", "ai.onnx"):
        return None
    if role_of(node) == PROTECTION and not sel.include_protection:
        g.reasons[node.output[0]] = PROTECTION_REASON
        return None
    if handler.kind == "elementwise" and g.types.get(node.output[0], (None,))[0] in _INTEGER_TYPES:
        g.reasons[node.output[0]] = INTEGER  # never a site, whatever the selection
        return None
    if node.output[0] in g.load_time and not sel.fault_constants:
        g.reasons[node.output[0]] = CONSTANT  # computed once at load: a weight, not per-inference arithmetic
        return None
    label = node.name or node.output[0]
    origin, origin_node = _origin(node)
    if not _selected(sel, node.op_type, origin, label, origin_node):
        g.reasons[node.output[0]] = NOT_SELECTED
        return None
    return _describe(g, node, handler, label, origin, origin_node, int_widths, result)


def _recovery_site(g: _Graph, if_node: onnx.NodeProto, sel: SiteSelection, int_widths, result: PassResult):
    """The virtual site of an ABFT unit's recovery (an ``If`` that ``abft`` marked): the site the
    unit's GEMM (or Conv) would be if it multiplied the operands the recompute multiplies, so that
    it is sampled exactly like that GEMM (every element of a full recompute, every item); the
    ``If``'s then branch applies the faults of the elements it actually recomputes
    (``_recovery_nodes``). ``extra["operands"]`` is that stand-in node (never added to the graph)."""
    info = json.loads(meta_of(if_node, RECOVERY_KEY))
    label = f"{info['unit']}/recovery"
    then = _branch(if_node, "then_branch")
    hooks = [n for n in then.node if meta_of(n, RECOMPUTE_KEY) is not None]
    if not hooks:
        result.skipped.append((label, "the ABFT If marks no recompute (hardened by an older onnxft?)"))
        return None
    op_type = info["op_type"]
    if not _selected(sel, op_type, op_type, label, info["unit"]):
        return None
    stand_in = helper.make_node(op_type, [info["a"], info["b"]] + ([info["bias"]] if info.get("bias") else []),
                                [info["output"]], name=label)
    if op_type == "Conv":  # the recompute's own attributes (strides, pads, ...)
        stand_in.attribute.extend(copy.deepcopy(next(n for n in hooks if n.op_type == "Conv").attribute))
    found = _describe(g, stand_in, handler_for(op_type), label, op_type, info["unit"], int_widths, result)
    if found is None:
        return None
    site, _, extra = found
    if site.gathered:  # the recovery path filters table rows, not the per-fault index matrix
        result.skipped.append((label, "recovery of a gathered convolution (not 2-D Conv) is not a site yet"))
        return None
    site.recovery_of = info["unit"]
    extra["operands"] = stand_in
    return site, if_node, extra


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _describe(g: _Graph, node: onnx.NodeProto, handler, label: str, origin: str, origin_node: str, int_widths,
              result: PassResult):
    """Describe the fault site of a selected node: (site, node to wrap, extra), or None with the
    reason in ``result.skipped``."""
    out = node.output[0]
    elem, out_rank = g.types.get(out, (None, None))
    extra: dict = {}
    wrapped = node
    if handler.kind in ("gemm", "conv"):
        da, db = _dq_source(g, node.input[0]), _dq_source(g, node.input[1])
        if da and db:
            fmt = "int8"
            extra = {"da": da, "db": db}
            widths = {"product": int(int_widths[0]), "sum": int(int_widths[1])}
        elif elem in (TensorProto.FLOAT, TensorProto.FLOAT16):
            fmt = "fp32" if elem == TensorProto.FLOAT else "fp16"
            widths = {"product": 32 if fmt == "fp32" else 16, "sum": 32}
        else:
            result.skipped.append((label, f"{node.op_type} output type {elem} is not fp32/fp16/int8-QDQ"))
            return None
        ranks = [out_rank, g.types.get(node.input[0], (0, None))[1], g.types.get(node.input[1], (0, None))[1]]
        if any(r is None for r in ranks):
            result.skipped.append((label, "operand ranks unknown after shape inference"))
            return None
        if handler.kind == "gemm" and ranks[2] < 2:
            result.skipped.append((label, "matrix-vector MatMul (1-D second operand) is not a site yet"))
            return None
        conv = {}
        bias = False
        if handler.kind == "conv":
            conv = _conv_attrs(node, ranks[1])
            if isinstance(conv, str):
                result.skipped.append((label, conv))
                return None
            bias = len(node.input) > 2 and bool(node.input[2])
            if bias and fmt == "int8":
                bsrc = g.producers.get(node.input[2])
                if bsrc is None or bsrc.op_type != "DequantizeLinear":
                    result.skipped.append((label, "int8 conv bias is not a dequantized int32 tensor"))
                    return None
                extra["bias_q"] = bsrc.input[0]
        per_channel = False
        if fmt == "int8":
            sb = g.const_value(extra["db"]["scale"])
            per_channel = sb is not None and np.size(sb) > 1
        site = Site(id="", node=label, op_type=node.op_type, kind=handler.kind, format=fmt,
                    origin=origin, origin_node=origin_node, output=out,
                    dtype="float32" if elem == TensorProto.FLOAT else "float16",
                    widths=widths, shape_ranks=ranks, conv=conv, bias=bias, per_channel=per_channel)
    else:
        # QDQ models: an elementwise op whose result is quantized (and used no other way) is an
        # integer op; fault the quantized 8-bit result.
        q = _quantizer_of(g, out, through_protection=role_of(node) != PROTECTION)
        if q is not None and q.output[0] not in g.claimed_quantizers:
            g.claimed_quantizers.add(q.output[0])
            wrapped = q
            q_out = wrapped.output[0]
            fmt, dtype = "int8", _DTYPE_NAMES[g.types[q_out][0]]
            out, out_rank = q_out, g.types[q_out][1]
        elif elem in (TensorProto.FLOAT, TensorProto.FLOAT16):
            fmt, dtype = ("fp32", "float32") if elem == TensorProto.FLOAT else ("fp16", "float16")
        elif elem in _INTEGER_TYPES:
            g.reasons[node.output[0]] = INTEGER  # shape and index arithmetic, not the network's data path
            return None
        else:
            result.skipped.append((label, f"output type {elem} is not a float or quantized tensor"))
            return None
        if out_rank is None:
            result.skipped.append((label, "output rank unknown after shape inference"))
            return None
        site = Site(id="", node=label, op_type=node.op_type, kind="elementwise", format=fmt,
                    origin=origin, origin_node=origin_node, output=out, dtype=dtype,
                    widths={"element": _ELEMENT_BITS[dtype]}, shape_ranks=[out_rank])
    return site, wrapped, extra


def _conv_attrs(node: onnx.NodeProto, x_rank: int) -> dict | str:
    """The geometry of a Conv/ConvTranspose site, or the reason it is not a site. Plain 2-D Conv
    keeps the offset form (``ConvFaults``); every other convolution is gathered
    (``ConvGatherFaults``: the sampler gives each fault's K input indices)."""
    d = x_rank - 2
    if d < 1:
        return f"{node.op_type} input of rank {x_rank} has no spatial axis"
    conv = {"strides": list(_attr(node, "strides", [1] * d)),
            "pads": list(_attr(node, "pads", [0] * (2 * d))),
            "dilations": list(_attr(node, "dilations", [1] * d)),
            "group": int(_attr(node, "group", 1)),
            "auto_pad": _text(_attr(node, "auto_pad", "NOTSET"))}
    if node.op_type == "ConvTranspose":
        if _attr(node, "output_shape", None) is not None or conv["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
            return "ConvTranspose with output_shape or auto_pad SAME is not a site yet (give explicit pads)"
        conv["transpose"] = True
    if node.op_type == "ConvTranspose" or d != 2:
        conv["gather"] = True
    return conv


def _quantizer_of(g: _Graph, out: str, through_protection: bool) -> onnx.NodeProto | None:
    """The QuantizeLinear (to int8/uint8) that quantizes ``out`` when that is all the model's own
    computation does with it: ``out``'s only consumer, or, in a hardened graph
    (``through_protection``), the one it reaches through the protection nodes that pass its
    values on (a range check, DMR's output tail). An ``If`` only decides and is not followed; so
    a DMR copy, which feeds nothing but the comparison, stays a float site of its own. This keeps
    an elementwise site's format and faulted tensor the same before and after ``harden``."""
    if not through_protection:
        cons = g.consumers.get(out, [])
        found = {id(c): c for c in cons}
    else:
        found, frontier, seen = {}, [out], {out}
        while frontier:
            for c in g.consumers.get(frontier.pop(), []):
                if role_of(c) != PROTECTION:
                    found[id(c)] = c
                elif c.op_type != "If":
                    for o in c.output:
                        if o and o not in seen:
                            seen.add(o)
                            frontier.append(o)
        cons = list(found.values())
    if (len(cons) == 1 and cons[0].op_type == "QuantizeLinear"
            and g.types.get(cons[0].output[0], (None,))[0] in (TensorProto.INT8, TensorProto.UINT8)):
        return cons[0]
    return None


def _vi(name: str, elem: int, rank: int | None):
    if rank is None:
        return helper.make_tensor_value_info(name, elem, None)
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(rank)])


class _Nodes:
    """Node list with unique names under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.n = 0

    def op(self, op_type, *inputs, n_out=1, domain=None, outputs=None, **attrs):
        if outputs is None:
            outputs = []
            for _ in range(n_out):
                self.n += 1
                outputs.append(f"{self.prefix}/t{self.n}")
        kwargs = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs),
                                           name=f"{self.prefix}/n{len(self.nodes)}", **kwargs, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _clone(node: onnx.NodeProto, output: str, name: str) -> onnx.NodeProto:
    n = copy.deepcopy(node)
    n.output[0] = output
    n.name = name
    return n


def _fault_nodes(site: Site, node: onnx.NodeProto, extra: dict, zero_bias: str, logging: bool,
                 table: str | None = None):
    """The site's own node (its output renamed) followed by its fault operator, which writes the
    original output name so consumers are untouched. ``table``: the fault table to read (default
    the site's graph input; a control-flow site reads the rows of the running execution)."""
    p = _Nodes(f"onnxft.{site.id}")
    names = dict(site.input_names())
    if table is not None:
        names["faults"] = table
    raw = f"onnxft.{site.id}/raw"
    p.nodes.append(_clone(node, raw, node.name or site.node))
    fn_outputs = [node.output[0], site.log_output()] if logging else [node.output[0]]
    if site.kind == "elementwise":
        p.op(op_name("FlipBits", site.dtype, logging), raw, names["faults"], domain=FAULT_DOMAIN, outputs=fn_outputs)
    else:
        _fault_op(p, site, node, raw, names["faults"], extra, zero_bias, logging, fn_outputs, p.nodes)
    for n in p.nodes[1:]:  # fault nodes carry the site's name, for profiles and error messages
        n.name = f"{site.node}/onnxft/{n.name.rsplit('/', 1)[-1]}"
    return p.nodes


def _fault_op(p: "_Nodes", site: Site, node: onnx.NodeProto, y: str, faults: str, extra: dict, zero_bias: str,
              logging: bool, outputs: list, pre: list) -> None:
    """Append to ``p`` the gemm/conv fault operator of ``site``: the faults of table ``faults``
    applied to ``y``, an output of ``node``'s product of ``node.input[0]`` and ``node.input[1]``.
    A constant transpose of B goes to ``pre`` (where onnxruntime can fold it at load time)."""
    names = site.input_names()
    fmt = {"fp32": "fp32", "fp16": "fp16", "int8": "int"}[site.format]
    a, b = node.input[0], node.input[1]
    if site.format == "int8":
        a, b = extra["da"]["q"], extra["db"]["q"]
    args = [a, b, y, faults]
    if site.kind == "conv":
        bias = zero_bias
        if site.bias:
            bias = extra["bias_q"] if site.format == "int8" else node.input[2]
        if site.gathered:
            args += [names["a_index"], names["b_index"], bias]
        else:
            args += [names["a_off"], names["b_off"], names["dh"], names["dw"], bias]
    if site.format == "int8":
        da, db = extra["da"], extra["db"]
        args += [da["zero"] or extra["za0"], db["zero"] or extra["zb0"], da["scale"], db["scale"]]
    b_rank = site.shape_ranks[2]
    attrs = {}
    if site.kind == "conv":
        name = op_name("ConvGatherFaults" if site.gathered else "ConvFaults", fmt, logging)
    elif b_rank == 2 and extra.get("b_constant"):
        # A constant weight: hand the operator B^T, whose rows are the columns a fault reads
        # (contiguous gathers; a column gather from B is strided and ~10x slower). onnxruntime
        # folds this Transpose once when it loads the model.
        bt = f"onnxft.{site.id}/bt"
        pre.append(helper.make_node("Transpose", [b], [bt], name=f"onnxft.{site.id}/transpose_b", perm=[1, 0]))
        args[1] = bt
        name = op_name("GemmFaultsBT", fmt, logging)
    elif b_rank >= 3:
        name = op_name("BatchedGemmFaults", fmt, logging)
        attrs["perm"] = list(range(b_rank - 2)) + [b_rank - 1, b_rank - 2]
    else:
        name = op_name("GemmFaults", fmt, logging)
    p.op(name, *args, domain=FAULT_DOMAIN, outputs=outputs, **attrs)


def _const(p: "_Nodes", array: np.ndarray) -> str:
    return p.op("Constant", value=numpy_helper.from_array(np.asarray(array)))


def _recovery_nodes(site: Site, if_node: onnx.NodeProto, extra: dict, zero_bias: str, logging: bool):
    """The ABFT ``If`` of a recovery site, its recovery faulted, and what it needs in the main graph.

    Each recompute node that ``abft`` marked (``RECOMPUTE_KEY``) computes values ``r`` that enter
    the output as ``ScatterND(target, index, r)``. Behind ``If(the site's table has rows)`` the then
    branch gets: a mask and a buffer of the output's shape holding every recomputed element; the
    table rows whose element the mask holds (rows of one element stay together, so only their
    ``prev`` links are renumbered); the site's fault operator applied to the buffer with those rows,
    on the operands the recompute multiplies; and ``r`` gathered back from the result. Faults on
    elements this run did not recompute are dropped: that thinning turns the full-recompute
    Binomial into Binomial(ops recomputed x bits, BER). Without rows the values pass unchanged.
    With logging the If gains the site's log output (``Site.log_columns``: a row per table row)."""
    pre: list = []
    node = copy.deepcopy(if_node)
    then = _branch(node, "then_branch")
    hooks = [(n, json.loads(meta_of(n, RECOMPUTE_KEY))) for n in then.node if meta_of(n, RECOMPUTE_KEY) is not None]
    targets = {m["target"] for _, m in hooks}
    if len(targets) != 1:
        raise InjectError(f"{site.node}: the recomputes of one ABFT unit scatter into {len(targets)} tensors")
    target = targets.pop()
    table = site.input_names()["faults"]
    values = [n.output[0] for n, _ in hooks]
    for n, _ in hooks:  # the marked node now writes r/exact; the gate below writes r
        n.output[0] = f"{n.output[0]}/exact"
    cols = site.columns()
    # then branch of the gate: the faults applied
    f = _Nodes(f"onnxft.{site.id}/recovery")
    shape = f.op("Shape", target)
    mask = f.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, bool)))
    buf = f.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, np.float32)))
    true = _const(f, np.array(True))
    for (n, m) in hooks:
        mask = f.op("ScatterND", mask, m["index"], f.op("Expand", true, f.op("Shape", n.output[0])))
        buf = f.op("ScatterND", buf, m["index"], n.output[0])
    out_index = f.op("Gather", table, _const(f, np.int64(cols.index("out_index"))), axis=1)
    keep = f.op("Gather", f.op("Reshape", mask, _const(f, np.array([-1], np.int64))), out_index)
    kept = f.op("Reshape", f.op("NonZero", keep), _const(f, np.array([-1], np.int64)))
    rows = f.op("Gather", table, kept, axis=0)
    # A chained row's prev is the row before it (fault_feeds orders rows by element); an element's
    # first row points at the table's length.
    rank = f.op("Gather", rows, _const(f, np.int64(cols.index("rank"))), axis=1)
    n_kept = f.op("Size", kept)
    zero, one = _const(f, np.int64(0)), _const(f, np.int64(1))
    prev = f.op("Where", f.op("Equal", rank, zero), n_kept, f.op("Sub", f.op("Range", zero, n_kept, one), one))
    i = cols.index("prev")
    axis1 = _const(f, np.array([1], np.int64))
    rows = f.op("Concat", f.op("Slice", rows, _const(f, np.array([0], np.int64)), _const(f, np.array([i], np.int64)), axis1),
                f.op("Unsqueeze", prev, axis1),
                f.op("Slice", rows, _const(f, np.array([i + 1], np.int64)), _const(f, np.array([len(cols)], np.int64)),
                     axis1), axis=1)
    faulted = f"onnxft.{site.id}/recovery/faulted"
    op_log = f"onnxft.{site.id}/recovery/op_log"
    _fault_op(f, site, extra["operands"], buf, rows, extra, zero_bias, logging, [faulted, op_log] if logging else [faulted],
              pre)
    then_outs = []
    for v, (_, m) in zip(values, hooks):
        then_outs.append(helper.make_tensor_value_info(f.op("GatherND", faulted, m["index"], outputs=[f"{v}/faulted"]),
                                                       TensorProto.FLOAT, None))
    # else branch of the gate: no rows, the values pass unchanged
    e = _Nodes(f"onnxft.{site.id}/recovery_idle")
    else_outs = [helper.make_tensor_value_info(e.op("Identity", n.output[0], outputs=[f"{v}/unfaulted"]),
                                               TensorProto.FLOAT, None) for v, (n, _) in zip(values, hooks)]
    if logging:
        unapplied = np.array([[np.nan, np.nan, 0.0]])
        full = f.op("Expand", _const(f, unapplied), f.op("Concat", f.op("Shape", table, end=1),
                                                         _const(f, np.array([3], np.int64)), axis=0))
        applied = f.op("Concat", op_log, f.op("Expand", _const(f, np.ones((1, 1))), f.op("Concat", f.op("Shape", kept),
                                                                                   _const(f, np.array([1], np.int64)), axis=0)), axis=1)
        log = f.op("ScatterND", full, f.op("Unsqueeze", kept, axis1), applied)
        then_outs.append(helper.make_tensor_value_info(log, TensorProto.DOUBLE, ["F", 3]))
        else_outs.append(helper.make_tensor_value_info(_const(e, np.zeros((0, 3))), TensorProto.DOUBLE, ["F", 3]))
    g = _Nodes(f"onnxft.{site.id}/recovery_gate")
    has_rows = g.op("Greater", g.op("Size", table), _const(g, np.int64(0)))
    gate_outs = values + ([f"onnxft.{site.id}/recovery/log"] if logging else [])
    g.nodes.append(helper.make_node("If", [has_rows], gate_outs, name=f"onnxft.{site.id}/recovery_gate/if",
                                    then_branch=helper.make_graph(f.nodes, f"onnxft_{site.id}_recovery_faults", [], then_outs),
                                    else_branch=helper.make_graph(e.nodes, f"onnxft_{site.id}_recovery_clean", [], else_outs)))
    nodes = _toposort(list(then.node) + g.nodes)
    del then.node[:]
    then.node.extend(nodes)
    if logging:  # the If reports the site's log: every row unapplied when nothing was recomputed
        then.output.append(helper.make_tensor_value_info(gate_outs[-1], TensorProto.DOUBLE, ["F", 3]))
        other = _branch(node, "else_branch")
        x = _Nodes(f"onnxft.{site.id}/recovery_pass")
        none = x.op("Expand", _const(x, np.array([[np.nan, np.nan, 0.0]])),
                    x.op("Concat", x.op("Shape", table, end=1), _const(x, np.array([3], np.int64)), axis=0))
        other.node.extend(x.nodes)
        other.output.append(helper.make_tensor_value_info(none, TensorProto.DOUBLE, ["F", 3]))
        node.output.append(site.log_output())
    return pre + [node]


def _toposort(nodes: list) -> list:
    """``nodes`` in an order where every node follows the producers of what it reads (its
    subgraphs' outer-scope reads included); otherwise the given order is kept."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{produced[x] for x in _all_inputs(n) if x in produced and produced[x] != i} for i, n in enumerate(nodes)]
    order, done, remaining = [], set(), list(range(len(nodes)))
    while remaining:
        k = next((k for k, i in enumerate(remaining) if deps[i] <= done), None)
        if k is None:
            raise InjectError("a recovery branch has a cycle after faulting it (please report this)")
        done.add(remaining[k])
        order.append(remaining.pop(k))
    return [nodes[i] for i in order]


def _is_constant(g: _Graph, name: str) -> bool:
    """``name`` is a weight: an initializer or a Constant node, possibly behind Identity nodes."""
    while name not in g.inits:
        n = g.producers.get(name)
        if n is None or n.op_type not in ("Constant", "Identity"):
            return False
        if n.op_type == "Constant":
            return True
        name = n.input[0]
    return True


def _group_of(node: onnx.NodeProto) -> str | None:
    """The fused op a decomposed node came from (None for the model's own nodes)."""
    props = {p.key: p.value for p in node.metadata_props}
    return props.get(ORIGIN_NODE_KEY)


def _log_vi(site: Site):
    return helper.make_tensor_value_info(site.log_output(), TensorProto.DOUBLE, ["F", site.log_columns()])


def _fused_fallback(original: onnx.NodeProto, nodes, sites, shapes, logging, g: _Graph):
    """``If(any of these sites has faults, or probe)``: then the decomposed primitives with their
    fault operators, else the original fused node (ONNX Runtime's own kernel, as in the clean
    model). BER 0 therefore computes exactly what the original model computes, and fused ops keep
    their speed in every batch where they are not hit. The then branch also returns the sites'
    shapes (the sampler needs them; a probe run takes that branch)."""
    gid = f"onnxft.{sites[0].id}"
    outs = [o for o in original.output if o]
    rename = {o: f"{gid}/then/{i}" for i, o in enumerate(outs)}
    then_nodes = []
    for n in nodes:
        n = copy.deepcopy(n)
        n.output[:] = [rename.get(o, o) for o in n.output]
        n.input[:] = [rename.get(i, i) for i in n.input]
        then_nodes.append(n)
    shapes_then = f"{gid}/shapes_then"
    then_nodes.append(helper.make_node("Concat", shapes, [shapes_then], name=f"{gid}/shapes_then", axis=0))
    total = sum(sum(s.shape_ranks) for s in sites)
    else_node = copy.deepcopy(original)
    else_node.output[:] = [f"{gid}/else/{i}" for i in range(len(outs))]
    else_nodes = [else_node, helper.make_node(
        "Constant", [], [f"{gid}/shapes_else"], name=f"{gid}/shapes_else",
        value=helper.make_tensor("z", TensorProto.INT64, [total], [0] * total))]
    then_outs = [_vi(rename[o], g.types.get(o, (TensorProto.FLOAT, None))[0], g.types.get(o, (None, None))[1])
                 for o in outs] + [helper.make_tensor_value_info(shapes_then, TensorProto.INT64, [total])]
    else_outs = [_vi(f"{gid}/else/{i}", g.types.get(o, (TensorProto.FLOAT, None))[0],
                     g.types.get(o, (None, None))[1]) for i, o in enumerate(outs)]
    else_outs.append(helper.make_tensor_value_info(f"{gid}/shapes_else", TensorProto.INT64, [total]))
    if_outputs = outs + [f"{gid}/shapes"]
    if logging:
        for s in sites:
            empty = f"{gid}/nolog/{s.id}"
            else_nodes.append(helper.make_node("Constant", [], [empty], name=empty,
                                               value=helper.make_tensor("e", TensorProto.DOUBLE, [0, 2], [])))
            then_outs.append(_log_vi(s))
            else_outs.append(helper.make_tensor_value_info(empty, TensorProto.DOUBLE, ["F", 2]))
            if_outputs.append(s.log_output())
        # inside the branch the logs need their own names
        for n in then_nodes:
            n.output[:] = [f"{o}/then" if o in {s.log_output() for s in sites} else o for o in n.output]
        for vi in then_outs:
            if vi.name in {s.log_output() for s in sites}:
                vi.name = vi.name + "/then"
    gate = _Nodes(f"{gid}/gate")
    has = gate.op("Or", _any_faults(gate, sites), PROBE_INPUT)
    gate.nodes.append(helper.make_node(
        "If", [has], if_outputs, name=original.name,
        then_branch=helper.make_graph(then_nodes, f"{gid}_decomposed", [], then_outs),
        else_branch=helper.make_graph(else_nodes, f"{gid}_fused", [], else_outs)))
    return gate.nodes, if_outputs, f"{gid}/shapes"


def inject(model: onnx.ModelProto, selection: SiteSelection | None = None,
           int_widths: tuple[int, int] = (16, 32), logging: bool = False,
           prepared: bool = False, fault_free_path: bool = False,
           transposed_weights: bool = False) -> PassResult:
    """Return the injection graph of ``model`` (see the module docstring).

    ``fault_free_path``: wrap it all in ``If(any faults)``, with the original nodes as the else
    branch (see ``_fault_free_fast_path``). Campaigns set it: they run at ORT level basic, where
    the else branch computes exactly what the original model computes. (At level all, onnxruntime
    applies some layout rewrites only outside subgraphs, so a plain-ORT user of a written graph is
    better served without it.)

    ``transposed_weights``: GEMM sites with a constant 2-D weight read it through a
    ``Transpose`` that onnxruntime folds at load time, so that a fault's operand column is one
    contiguous row (much faster fault work on big models, one transposed copy of each such weight
    in memory). Campaigns set it too."""
    selection = selection or SiteSelection()
    for w in int_widths:
        if not 2 <= int(w) <= 32:
            raise InjectError(f"integer widths must be between 2 and 32 bits, got {w}")
    base = model if prepared else prepare(model)
    dec = decompose(base)
    m = prepare(dec.model) if dec.inserted else dec.model
    result = PassResult(model=m, inserted=list(dec.inserted), skipped=list(dec.skipped))
    g = _Graph(m)
    found, nested = _find_sites(g, selection, int_widths, result)
    result.details["non_sites"] = non_sites(m.graph, g.covered, g.reasons, result.skipped)
    if not found:
        raise InjectError(why_no_sites(result.details["non_sites"]))

    graph = m.graph
    by_node = {id(n): (s, e) for s, n, e in found}
    new_nodes: list[onnx.NodeProto] = []
    new_inputs, new_inits, shape_vecs = [], [], []
    zero_bias = "onnxft.zero_bias"  # bias operand of ConvFaults for convolutions without one
    if any(s.kind == "conv" and not s.bias for s, _, _ in found):
        new_inits.append(numpy_helper.from_array(np.zeros(1, np.float32), zero_bias))
    int_zero_names = {}

    def zero_point(qtype):
        if qtype not in int_zero_names:
            name = f"onnxft.zero_{_DTYPE_NAMES[qtype]}"
            dt = np.int8 if qtype == TensorProto.INT8 else np.uint8
            new_inits.append(numpy_helper.from_array(np.zeros((), dt), name))
            int_zero_names[qtype] = name
        return int_zero_names[qtype]

    log_outputs = []
    fused = {n.name: n for n in base.graph.node if n.name}
    base_inits = {t.name: t for t in base.graph.initializer}
    restored: set[str] = set()
    pending: list = []  # (origin node name, emitted nodes, sites, shape outputs) of one fused op

    def declare(site, extra):
        """The site's fault inputs (empty by default) and the constants its operator reads."""
        if site.format == "int8" and site.kind != "elementwise":
            extra["za0"] = zero_point(extra["da"]["qtype"])
            extra["zb0"] = zero_point(extra["db"]["qtype"])
        names = site.input_names()
        n_cols = len(site.columns())
        new_inputs.append(helper.make_tensor_value_info(names["faults"], TensorProto.INT64, [f"F_{site.id}", n_cols]))
        new_inits.append(numpy_helper.from_array(np.zeros((0, n_cols), np.int64), names["faults"]))
        for key, name in names.items():
            if key == "faults":
                continue
            if key in ("a_index", "b_index"):  # [F, K]: each fault's K operand indices (gathered convolutions)
                dims = [f"F_{site.id}", f"K_{site.id}"]
                new_inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, dims))
                new_inits.append(numpy_helper.from_array(np.zeros((0, 0), np.int64), name))
                continue
            new_inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, [f"K_{site.id}"]))
            new_inits.append(numpy_helper.from_array(np.zeros((0,), np.int64), name))

    nested_tops = {loc[0] for loc in nested}
    executions_outputs = []

    def emit_control_flow(node, pos):
        """``node`` (an If/Loop/Scan holding sites) with its sites faulted and their executions
        threaded out to ``onnxft.<site>.executions`` outputs (``_thread``)."""
        under = sorted(((loc, s, e) for loc, (s, e) in nested.items() if loc[0] == pos), key=lambda t: t[1].id)
        out, state = [], {}
        for _, site, extra in under:
            declare(site, extra)
            width = 1 + sum(site.shape_ranks)
            state[site.id] = f"onnxft.{site.id}/executions0"
            out.append(helper.make_node("Constant", [], [state[site.id]], name=f"onnxft.{site.id}/executions0",
                                        value=numpy_helper.from_array(np.zeros((0, width), np.int64))))
            result.inserted.append(f"{site.id} {site.kind}/{site.format} {site.op_type} {site.node}")

        def build(site, inner, extra, table):
            return _fault_nodes(site, inner, extra, zero_bias, False, table=table)

        top = copy.deepcopy(node)
        pre, post = _thread(top, (pos,), nested, state, build)
        out.extend(pre + [top] + post)
        for _, site, _ in under:
            out.append(helper.make_node("Identity", [state[site.id]], [site.executions_output()],
                                        name=f"onnxft.{site.id}/executions"))
            executions_outputs.append(helper.make_tensor_value_info(
                site.executions_output(), TensorProto.INT64, ["E", 1 + sum(site.shape_ranks)]))
            if logging:  # fault logs do not reach out of subgraphs: an empty log
                out.append(helper.make_node("Constant", [], [site.log_output()], name=f"onnxft.{site.id}/nolog",
                                            value=helper.make_tensor("e", TensorProto.DOUBLE, [0, 2], [])))
        return out, [s for _, s, _ in under], []

    def emit(node, pos):
        """The nodes that replace ``node``, its sites and the names of their shape vectors."""
        if pos in nested_tops:
            return emit_control_flow(node, pos)
        if id(node) not in by_node:
            return [node], [], []
        site, extra = by_node[id(node)]
        operands = extra.get("operands", node)  # a recovery site: the recompute's stand-in node
        if site.kind == "gemm" and transposed_weights:
            extra["b_constant"] = _is_constant(g, extra["db"]["q"] if site.format == "int8" else operands.input[1])
        declare(site, extra)
        if site.recovery_of:
            out = _recovery_nodes(site, node, extra, zero_bias, logging)
        else:
            out = _fault_nodes(site, node, extra, zero_bias, logging)
        # Shapes for the sampler: output, and operands for gemm/conv.
        shape_src = [operands.output[0]]
        if site.kind != "elementwise":
            shape_src += [operands.input[0], operands.input[1]]
        shapes = []
        for t in shape_src:
            name = f"onnxft.{site.id}/shape{len(shapes)}"
            out.append(helper.make_node("Shape", [t], [name], name=f"{site.node}/onnxft/shape{len(shapes)}"))
            shapes.append(name)
        result.inserted.append(f"{site.id} {site.kind}/{site.format} {site.op_type} {site.node}")
        return out, [site], shapes

    def flush():
        if not pending:
            return
        origin, nodes, sites, shapes = pending.pop()
        if not sites:
            new_nodes.extend(nodes)
            return
        if origin not in fused or inline_group:  # no fused original to fall back on (or control flow
            # whose executions must reach the main graph): keep the primitives inline
            new_nodes.extend(nodes)
            shape_vecs.extend(shapes)
            log_outputs.extend(_log_vi(s) for s in sites if logging)
            return
        # the fused node's own constants (decompose dropped those only it read, e.g. BatchNorm stats)
        for name in fused[origin].input:
            if name and name not in g.inits and name in base_inits and name not in restored:
                new_inits.append(base_inits[name])
                restored.add(name)
        node, if_outputs, shape_out = _fused_fallback(fused[origin], nodes, sites, shapes, logging, g)
        new_nodes.extend(node)
        shape_vecs.append(shape_out)
        log_outputs.extend(_log_vi(s) for s in sites if logging)

    inline_group = False
    for pos, node in enumerate(graph.node):
        origin = _group_of(node)
        if pending and pending[0][0] != origin:
            flush()
            inline_group = False
        emitted, sites, shapes = emit(node, pos)
        inline_group = inline_group or (origin is not None and pos in nested_tops)
        if origin is None:
            new_nodes.extend(emitted)
            shape_vecs.extend(shapes)
            log_outputs.extend(_log_vi(s) for s in sites if logging)
            continue
        if not pending:
            pending.append((origin, [], [], []))
        pending[0][1].extend(emitted)
        pending[0][2].extend(sites)
        pending[0][3].extend(shapes)
    flush()
    # Tensors that moved into If branches keep no value_info in the main graph.
    produced = {o for n in new_nodes for o in n.output}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    new_inputs.append(helper.make_tensor_value_info(PROBE_INPUT, TensorProto.BOOL, []))
    new_inits.append(numpy_helper.from_array(np.array(False), PROBE_INPUT))

    if shape_vecs:
        new_nodes.append(helper.make_node("Concat", shape_vecs, [SHAPES_OUTPUT], name="onnxft/shapes", axis=0))
    else:  # every site is inside control flow
        new_nodes.append(helper.make_node("Constant", [], [SHAPES_OUTPUT], name="onnxft/shapes",
                                          value=numpy_helper.from_array(np.zeros(0, np.int64))))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.input.extend(new_inputs)
    graph.initializer.extend(new_inits)
    graph.output.append(helper.make_tensor_value_info(SHAPES_OUTPUT, TensorProto.INT64, ["S"]))
    graph.output.extend(executions_outputs)
    graph.output.extend(log_outputs)
    if fault_free_path:
        _fault_free_fast_path(graph, base.graph, [s for s, _, _ in found])
    # Value info of the replaced node outputs stays valid (same names, same types).
    fns = all_functions()
    used = {n.op_type for _, n in walk(graph) if n.domain == FAULT_DOMAIN}
    m.functions.extend(fns[name] for name in sorted(used))
    m.opset_import.append(helper.make_opsetid(FAULT_DOMAIN, FAULT_DOMAIN_VERSION))
    table = SiteTable([s for s, _, _ in found], OPSET, tuple(int(w) for w in int_widths), logging)
    set_meta(m, SITES_KEY, table.to_json())
    source = default_opset(model, OPSET)
    set_meta(m, SOURCE_OPSET_KEY, str(source))
    return result


def _thread(node: onnx.NodeProto, loc: tuple, nested: dict, state: dict, build) -> tuple[list, list]:
    """Fault the sites inside ``node`` (an If, Loop or Scan, edited in place) and thread each one's
    executions log through it: ``state[site]`` names the log ([E, 1 + R] int64, one row per
    execution so far) readable where ``node`` runs, and is set to the log after ``node``.
    Returns the nodes to place before and after ``node``.

    If: both branches output every log (the untaken one passes it on unchanged). Loop: each log
    becomes a loop-carried variable, so its row count is the number of executions so far, which
    is also the running execution's index (``_site_in_body``). Scan (whose state variables keep
    their shape): a counter is the state variable and each iteration's row a scan output,
    appended to the log after the Scan; so sites sit directly in a Scan body (``_find_nested``)."""
    inside = {nested[k][0].id: nested[k][0] for k in nested if k[:len(loc)] == loc and len(k) > len(loc)}
    under = sorted(inside.values(), key=lambda s: s.id)
    ids = [s.id for s in under]
    tag = "/".join(str(x) for x in loc)
    if node.op_type == "If":
        outs = []
        for a in node.attribute:
            if a.type != onnx.AttributeProto.GRAPH:
                continue
            inner = dict(state)
            _thread_body(a.g, loc + (a.name,), nested, inner, build)
            for s in under:
                name = f"onnxft.{s.id}/executions@{tag}/{a.name}"
                a.g.node.append(helper.make_node("Identity", [inner[s.id]], [name], name=name))
                a.g.output.append(helper.make_tensor_value_info(name, TensorProto.INT64,
                                                                [None, 1 + sum(s.shape_ranks)]))
        for s in under:
            outs.append(f"onnxft.{s.id}/executions@{tag}")
            node.output.append(outs[-1])
        state.update(zip(ids, outs))
        return [], []
    body = next(a.g for a in node.attribute if a.name == "body")
    if node.op_type == "Scan":
        return _thread_scan(node, body, loc, nested, state, build, under, tag)
    if node.op_type == "Loop":
        first_in, first_out, first_node_out = 2 + len(node.input) - 2, 1 + len(node.input) - 2, len(node.input) - 2
    else:  # Scan: state variables come first
        n_state = len(node.input) - next(a.i for a in node.attribute if a.name == "num_scan_inputs")
        first_in, first_out, first_node_out = n_state, n_state, n_state
    inner = dict(state)
    body_in, body_out, node_out = [], [], []
    for s in under:
        width = 1 + sum(s.shape_ranks)
        inner[s.id] = f"onnxft.{s.id}/executions@{tag}/in"
        body_in.append(helper.make_tensor_value_info(inner[s.id], TensorProto.INT64, [None, width]))
        node_out.append(f"onnxft.{s.id}/executions@{tag}")
    _thread_body(body, loc + ("body",), nested, inner, build)
    for s in under:
        name = f"onnxft.{s.id}/executions@{tag}/out"
        body.node.append(helper.make_node("Identity", [inner[s.id]], [name], name=name))
        body_out.append(helper.make_tensor_value_info(name, TensorProto.INT64, [None, 1 + sum(s.shape_ranks)]))
    ins = list(body.input)
    ins[first_in:first_in] = body_in
    del body.input[:]
    body.input.extend(ins)
    outs = list(body.output)
    outs[first_out:first_out] = body_out
    del body.output[:]
    body.output.extend(outs)
    node_inputs = list(node.input)
    where = len(node_inputs) if node.op_type == "Loop" else first_in
    node_inputs[where:where] = [state[i] for i in ids]
    node_outputs = list(node.output)
    node_outputs[first_node_out:first_node_out] = node_out
    del node.input[:]
    node.input.extend(node_inputs)
    del node.output[:]
    node.output.extend(node_outputs)
    state.update(zip(ids, node_out))
    return [], []


def _thread_scan(node, body, loc, nested, state, build, under, tag) -> tuple[list, list]:
    """``_thread`` for a Scan: counters as state variables, execution rows as scan outputs."""
    n_state = len(node.input) - next(a.i for a in node.attribute if a.name == "num_scan_inputs")
    pre, post = _Nodes(f"onnxft.scan@{tag}/before"), _Nodes(f"onnxft.scan@{tag}/after")
    inner = dict(state)
    counters_in, counters_body_in = [], []
    for s in under:
        counters_in.append(pre.op("Squeeze", pre.op("Shape", state[s.id], end=1)))
        counters_body_in.append(f"onnxft.{s.id}/count@{tag}/in")
        inner[s.id] = ("scan", counters_body_in[-1])
    _thread_body(body, loc + ("body",), nested, inner, build)
    counters_body_out, rows = [], []
    for s, c in zip(under, counters_body_in):
        one = f"onnxft.{s.id}/count@{tag}/one"
        body.node.append(helper.make_node("Constant", [], [one], name=one, value=numpy_helper.from_array(np.int64(1))))
        counters_body_out.append(f"onnxft.{s.id}/count@{tag}/out")
        body.node.append(helper.make_node("Add", [c, one], [counters_body_out[-1]], name=counters_body_out[-1]))
        rows.append(inner[s.id][1])
    scalar = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, [])  # noqa: E731
    ins = list(body.input)
    ins[n_state:n_state] = [scalar(c) for c in counters_body_in]
    del body.input[:]
    body.input.extend(ins)
    outs = list(body.output)
    outs[n_state:n_state] = [scalar(c) for c in counters_body_out]
    outs += [helper.make_tensor_value_info(r, TensorProto.INT64, [1 + sum(s.shape_ranks)]) for s, r in zip(under, rows)]
    del body.output[:]
    body.output.extend(outs)
    node_inputs = list(node.input)
    node_inputs[n_state:n_state] = counters_in
    node_outputs = list(node.output)
    node_outputs[n_state:n_state] = [f"onnxft.{s.id}/count@{tag}" for s in under]
    row_outs = [f"onnxft.{s.id}/rows@{tag}" for s in under]
    node_outputs += row_outs
    del node.input[:]
    node.input.extend(node_inputs)
    del node.output[:]
    node.output.extend(node_outputs)
    for a in node.attribute:  # scan outputs stack along axis 0, forwards
        if a.name in ("scan_output_axes", "scan_output_directions"):
            a.ints.extend([0] * len(under))
    for s, r in zip(under, row_outs):
        state[s.id] = post.op("Concat", state[s.id], r, axis=0)
    return pre.nodes, post.nodes


def _thread_body(graph: onnx.GraphProto, loc: tuple, nested: dict, state: dict, build) -> None:
    """Fault the sites of one branch or body (nodes at ``loc + (position,)``), recursing into the
    control flow nodes that hold more."""
    new_nodes = []
    for i, n in enumerate(list(graph.node)):
        where = loc + (i,)
        if where in nested:
            site, extra = nested[where]
            new_nodes.extend(_site_in_body(site, n, extra, state, build))
        elif any(k[:len(where)] == where for k in nested):
            n = copy.deepcopy(n)
            pre, post = _thread(n, where, nested, state, build)
            new_nodes.extend(pre + [n] + post)
        else:
            new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _site_in_body(site: Site, node: onnx.NodeProto, extra: dict, state: dict, build) -> list:
    """A site inside control flow: its fault operator reads the rows of its table whose
    ``execution`` column equals the number of earlier executions (the rows of its log), and a
    row with its shapes is appended to the log."""
    log = state[site.id]
    f = _Nodes(f"onnxft.{site.id}/execution")
    cols = len(site.columns()) - 1
    table = site.input_names()["faults"]
    if isinstance(log, tuple):  # directly in a Scan body: the counter (``_thread_scan``)
        execution = f.op("Unsqueeze", log[1], _const(f, np.array([0], np.int64)))
    else:
        execution = f.op("Shape", log, end=1)
    column = f.op("Gather", table, _const(f, np.int64(cols)), axis=1)
    keep = f.op("Reshape", f.op("NonZero", f.op("Equal", column, execution)), _const(f, np.array([-1], np.int64)))
    rows = f.op("Slice", f.op("Gather", table, keep, axis=0), _const(f, np.array([0], np.int64)),
                _const(f, np.array([cols], np.int64)), _const(f, np.array([1], np.int64)))
    nodes = f.nodes + build(site, node, extra, rows)
    r = _Nodes(f"onnxft.{site.id}/executed")
    parts = [_const(r, np.array([1], np.int64)), r.op("Shape", node.output[0])]
    if site.kind != "elementwise":
        parts += [r.op("Shape", node.input[0]), r.op("Shape", node.input[1])]
    if isinstance(log, tuple):  # a scan output of the Scan
        state[site.id] = ("row", r.op("Concat", *parts, axis=0))
        return nodes + r.nodes
    row = r.op("Unsqueeze", r.op("Concat", *parts, axis=0), _const(r, np.array([0], np.int64)))
    state[site.id] = r.op("Concat", log, row, axis=0)
    return nodes + r.nodes


def _fault_free_fast_path(graph: onnx.GraphProto, original: onnx.GraphProto, sites: list[Site]) -> None:
    """Wrap the whole injection graph in ``If(any fault table has rows, or probe)``: the then branch
    is the injection graph, the else branch the original model's own nodes. A run without faults
    (BER 0, and most batches at low BERs) then costs the original model plus about a dozen tiny
    nodes instead of a gate per site, and computes exactly what the original model computes.

    The gate reads all tables through one ``Concat`` per table width (empty tables cost nothing)."""
    out_vis = list(graph.output)
    outs = [o.name for o in out_vis]
    # then: the injection graph; its results leave the branch under their own names
    then_nodes = list(graph.node) + [helper.make_node("Identity", [o], [f"{o}@faulty"], name=f"onnxft/out{i}")
                                     for i, o in enumerate(outs)]
    then_outs = []
    for vi in out_vis:
        v = copy.deepcopy(vi)
        v.name = f"{vi.name}@faulty"
        then_outs.append(v)
    then_graph = helper.make_graph(then_nodes, "onnxft_faulty", [], then_outs, value_info=list(graph.value_info))
    # else: the original nodes, every tensor they produce renamed so the branches share no names
    produced = {o for n in original.node for o in n.output if o}
    rename = {t: f"onnxft.clean/{t}" for t in produced}
    else_nodes = []
    for n in original.node:
        n = copy.deepcopy(n)
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
        _rename_outer_refs(n, rename)
        else_nodes.append(n)
    else_outs = []
    for vi in out_vis:
        v = copy.deepcopy(vi)
        if vi.name == SHAPES_OUTPUT:  # the sampler only reads shapes from a probe run (then branch)
            v.name = f"{SHAPES_OUTPUT}@clean"
            total = sum(sum(s.shape_ranks) for s in sites)
            else_nodes.append(helper.make_node("Constant", [], [v.name], name="onnxft/clean_shapes",
                                               value=helper.make_tensor("z", TensorProto.INT64, [total], [0] * total)))
        elif vi.name.startswith("onnxft."):  # fault logs, executions of control-flow sites: empty
            v.name = f"{vi.name}@clean"
            width = vi.type.tensor_type.shape.dim[1].dim_value
            else_nodes.append(helper.make_node("Constant", [], [v.name], name=f"onnxft/clean_log{len(else_nodes)}",
                                               value=helper.make_tensor("e", vi.type.tensor_type.elem_type,
                                                                        [0, width], [])))
        else:
            v.name = rename.get(vi.name, vi.name)
            if v.name == vi.name:  # an output that is an input or a weight: pass it through
                v.name = f"{vi.name}@clean"
                else_nodes.append(helper.make_node("Identity", [vi.name], [v.name], name=f"onnxft/clean_out{len(else_nodes)}"))
        else_outs.append(v)
    else_graph = helper.make_graph(else_nodes, "onnxft_clean", [], else_outs)
    gate = _Nodes("onnxft/gate")
    has = gate.op("Or", _any_faults(gate, sites), PROBE_INPUT)
    gate.nodes.append(helper.make_node("If", [has], outs, name="onnxft/faulty_or_clean",
                                       then_branch=then_graph, else_branch=else_graph))
    # weights only the original nodes read (e.g. the statistics of a BatchNorm that decompose folded)
    have = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    read = {i for n in else_nodes for i in _all_inputs(n)}
    graph.initializer.extend(t for t in original.initializer if t.name in read and t.name not in have)
    del graph.node[:]
    graph.node.extend(gate.nodes)
    del graph.value_info[:]


def _any_faults(gate: _Nodes, sites: list[Site]) -> str:
    """Bool: some fault table of ``sites`` has rows. One ``Concat`` per table width and one
    ``Size`` each, instead of a ``Size`` per site (concatenating empty tables costs nothing)."""
    by_width: dict[int, list[str]] = {}
    for s in sites:
        by_width.setdefault(len(s.columns()), []).append(s.input_names()["faults"])
    total = None
    for _, tables in sorted(by_width.items()):
        size = gate.op("Size", gate.op("Concat", *tables, axis=0) if len(tables) > 1 else tables[0])
        total = size if total is None else gate.op("Add", total, size)  # (Sum takes no int64)
    return gate.op("Greater", total, gate.op("Constant", value=helper.make_tensor("z", TensorProto.INT64, [], [0])))


def _rename_outer_refs(node: onnx.NodeProto, rename: dict) -> None:
    """Rename the outer-scope tensors that ``node``'s subgraphs (If/Loop/Scan bodies) read."""
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            inner = {k: v for k, v in rename.items() if k not in local}
            for n in g.node:
                n.input[:] = [inner.get(i, i) for i in n.input]
                _rename_outer_refs(n, inner)
            for o in g.output:
                if o.name in inner:
                    o.name = inner[o.name]


def _all_inputs(node: onnx.NodeProto):
    """Tensor names ``node`` reads, its subgraphs' nodes included."""
    yield from node.input
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                yield from _all_inputs(n)


def selection_from_options(op_types: Iterable[str] | None = None, names: str | None = None,
                           formats: Iterable[str] | None = None,
                           scales: Iterable[tuple[str, float]] = (),
                           include_protection: bool = False, fault_constants: bool = False) -> SiteSelection:
    fmts = None
    if formats:
        fmts = frozenset(formats)
        bad = fmts - set(FORMATS)
        if bad:
            raise InjectError(f"unknown format(s) {sorted(bad)}; choose from {', '.join(FORMATS)}")
    if names is not None:
        try:
            re.compile(names)
        except re.error as exc:
            raise InjectError(f"bad --sites pattern {names!r}: {exc}") from None
    return SiteSelection(op_types=frozenset(op_types) if op_types else None, names=names,
                         formats=fmts, scales=tuple(scales), include_protection=include_protection,
                         fault_constants=fault_constants)
