"""The site table: every fault site of an injection graph, as plain data.

The inject pass writes it into the model (metadata ``onnxft.sites``, JSON) and the sampler and
reports read it back, so an injection graph on disk is self-describing.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx

SITES_KEY = "onnxft.sites"
SHAPES_OUTPUT = "onnxft.shapes"
SOURCE_OPSET_KEY = "onnxft.source_opset"  # the user's model's default-domain opset, before the upgrade
PROBE_INPUT = "onnxft.probe"  # True: take every decomposed path, so that onnxft.shapes is complete
EXECUTION_COLUMN = "execution"  # last column of a control-flow site's fault table

# Columns of a site's fault table (int64 [F, C]): defined by the operators that read them.
from ..custom_ops.functions import ELEMENTWISE_COLUMNS, table_columns  # noqa: E402


@dataclass
class Site:
    """One fault site. ``tensors`` names the graph tensors it reads (see ``inject``)."""

    id: str
    node: str
    op_type: str
    kind: str  # gemm | conv | elementwise
    format: str  # fp32 | fp16 | int8
    origin: str  # the op type before decomposition (Softmax, LayerNormalization...) or op_type
    origin_node: str
    output: str
    dtype: str  # element type of the faulted tensor: float32 | float16 | int8 | uint8
    widths: dict = field(default_factory=dict)  # gemm: product/sum bits; elementwise: element bits
    shape_ranks: list = field(default_factory=list)  # ranks of [output, a, b] in the shapes vector
    # strides, pads, dilations, group, auto_pad; "gather": True for ConvGatherFaults sites, with
    # "transpose": True for ConvTranspose
    conv: dict = field(default_factory=dict)
    bias: bool = False
    per_channel: bool = False  # int8: weight scale/zero point per output channel
    scale: float = 1.0  # multiplies the BER at this site (0 = perfectly protected)
    # The ABFT unit whose recovery recompute this virtual site is (inject --inject-protection): sampled
    # as that unit's full recompute, applied only to the elements a run recomputes. None: a node.
    recovery_of: str | None = None
    # Inside control flow: the If branches and Loop/Scan bodies that hold the node, e.g.
    # "If_0/then/Loop_2/body" ("" in the main graph). Such a site runs 0, 1 or many times per run;
    # its fault table has one more column, "execution" (docs/fault_model.md, "Sites in control flow").
    path: str = ""

    def columns(self) -> tuple[str, ...]:
        if self.kind == "elementwise":
            base = ELEMENTWISE_COLUMNS
        else:
            base = table_columns(conv=self.kind == "conv", is_int=self.format == "int8", gathered=self.gathered)
        return base + (EXECUTION_COLUMN,) if self.path else base

    def executions_output(self) -> str:
        """Graph output of a control-flow site: int64 [E, 1 + sum(shape_ranks)], one row per
        execution in execution order: 1, then the shapes of its output (and operands)."""
        return f"onnxft.{self.id}.executions"

    @property
    def gathered(self) -> bool:
        """A convolution whose operand indices the sampler gives whole (ConvGatherFaults): 1-D,
        3-D, ConvTranspose; plain 2-D Conv uses the offset form (ConvFaults)."""
        return self.kind == "conv" and bool(self.conv.get("gather"))

    def input_names(self) -> dict[str, str]:
        """Graph inputs that carry this site's faults (all default to empty tensors)."""
        names = {"faults": f"onnxft.{self.id}.faults"}
        if self.gathered:
            names.update({k: f"onnxft.{self.id}.{k}" for k in ("a_index", "b_index")})
        elif self.kind == "conv":
            names.update({k: f"onnxft.{self.id}.{k}" for k in ("a_off", "b_off", "dh", "dw")})
        return names

    def log_output(self) -> str:
        return f"onnxft.{self.id}.log"

    def log_columns(self) -> int:
        """Columns of the fault log: (value before the flip, after it), and for a recovery site
        whether the fault was applied (1) or fell on an element the run did not recompute (0)."""
        return 3 if self.recovery_of else 2


@dataclass
class SiteTable:
    sites: list[Site]
    opset: int = 26
    int_widths: tuple[int, int] = (16, 32)
    logging: bool = False

    def to_json(self) -> str:
        return json.dumps({"sites": [asdict(s) for s in self.sites], "opset": self.opset,
                           "int_widths": list(self.int_widths), "logging": self.logging})

    @classmethod
    def from_json(cls, text: str) -> "SiteTable":
        data = json.loads(text)
        return cls([Site(**s) for s in data["sites"]], data.get("opset", 26),
                   tuple(data.get("int_widths", (16, 32))), data.get("logging", False))

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "SiteTable":
        for prop in model.metadata_props:
            if prop.key == SITES_KEY:
                return cls.from_json(prop.value)
        raise ValueError("this model is not an onnxft injection graph (no onnxft.sites metadata)")
