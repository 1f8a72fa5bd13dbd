"""One campaign spec: everything a campaign (eval, compare, vuln, harden --select) is run with.

Every verb builds a ``CampaignSpec``; every campaign function takes ``(model, data, spec)`` (the
loaded model and Dataset, and this spec). The spec is frozen, plain data, stored with the results
(``"spec"`` in results.json / compare.json) and round-trips exactly through ``to_json`` /
``from_json``. One field per option, each with a default: adding an option is adding a field.
Fields a campaign does not use are kept at their defaults (e.g. ``schemes`` in eval).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace

from ..faults.sampling import DEFAULT_MAX_FAULTS
from ..passes.inject import SiteSelection
from ..passes.thresholds import DEFAULT_PRECISION
from ..runtime.data import InputLayout
from .outcomes import OutcomeOptions

METRICS = ("top1", "sdc")
FAULT_MODELS = ("operation", "variable")


@dataclass(frozen=True)
class CampaignSpec:
    # what is measured
    model: str | None = None  # model path or sample name (None: a ModelProto given in Python)
    model_name: str = "model"  # display name in tables and plots
    data: str | None = None  # .npz path of the data (None: in-memory data)
    bers: tuple[float, ...] = (0.0, 1e-9, 1e-8, 1e-7)
    trials: int = 3
    seed: int = 0
    metric: str = "top1"  # top1 (accuracy against labels) | sdc (outcome rates against the clean run)
    outcome: OutcomeOptions = field(default_factory=OutcomeOptions)  # checked outputs, SDC criterion
    # where faults go
    # include_protection: --inject-protection; fault_constants: --fault-constants
    selection: SiteSelection = field(default_factory=SiteSelection)
    int_widths: tuple[int, int] = (16, 32)
    max_faults: float | None = DEFAULT_MAX_FAULTS  # expected flips per batch above which a BER is refused
    # operation: a BER per (operation, bit) (docs/fault_model.md); variable: a BER per stored bit-cycle
    # of the GEMM/Conv variables under the dataflow ``hw`` (docs/resiliency_accuracy.md)
    fault_model: str = "operation"
    hw: str | None = None  # ws:RxC, os:RxC, is:RxC, gpu:TMxTNxTK or equal (fault_model variable)
    variables: tuple[str, ...] = ("weight", "input", "psum")  # the variable kinds faults may hit
    # how it runs
    provider: str = "auto"
    threads: int | None = None
    batch: int = 64
    limit: int | None = None
    inputs: InputLayout = field(default_factory=InputLayout)  # --shape / --batch-axis (runtime.data)
    # protection schemes (compare)
    schemes: tuple[str, ...] = ()
    calib: str | None = None
    design_ber: float | None = None  # block sizes and Algorithm 1 are chosen for it (default: max(bers))
    range_mode: str = "clamp"
    range_kinds: tuple[str, ...] = ("softmax", "gelu")
    alpha: float = 0.02
    precision: str = DEFAULT_PRECISION  # arithmetic of the serving runtime: ABFT thresholds (passes.thresholds)
    abft_impl: str = "global"  # how ABFT schemes build each GEMM's check (harden --abft-impl; campaigns.abft_impl)
    dmr: tuple[str, ...] = ("LayerNormalization",)
    latency: bool = False
    # Algorithm 1 (harden --select auto, compare's auto)
    target_drop: float = 0.02
    max_overhead: float = 0.02
    # vulnerability factors (vuln; Algorithm 1 ranks with them)
    granularity: tuple[str, ...] = ("layer",)
    target_losses: tuple[float, ...] = ()
    loss_mode: str = "relative"
    max_trials: int = 10
    ci_width: float = 0.02
    search_trials: int = 1
    patch: tuple[int, int] | None = None

    def replace(self, **changes) -> "CampaignSpec":
        return replace(self, **changes)

    @property
    def algorithm_ber(self) -> float:
        """The BER Algorithm 1 and the block sizes are chosen for."""
        return float(self.design_ber if self.design_ber is not None else max(self.bers))

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples and sets become lists; sets sorted)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict | str) -> "CampaignSpec":
        """The spec ``to_json`` wrote (a dict or its JSON text); unknown keys are an error."""
        d = upgraded(json.loads(data) if isinstance(data, str) else dict(data))
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"campaign spec: unknown field(s) {', '.join(unknown)}")
        kw = {k: _thaw_tuple(v) for k, v in d.items()}
        if "outcome" in d:
            kw["outcome"] = OutcomeOptions(**{k: _thaw_tuple(v) for k, v in d["outcome"].items()})
        if "inputs" in d:
            kw["inputs"] = InputLayout(shapes={k: tuple(v) for k, v in d["inputs"].get("shapes", {}).items()},
                                       batch_axes=dict(d["inputs"].get("batch_axes", {})))
        if "selection" in d:
            s = d["selection"]
            kw["selection"] = SiteSelection(
                op_types=None if s.get("op_types") is None else frozenset(s["op_types"]), names=s.get("names"),
                formats=None if s.get("formats") is None else frozenset(s["formats"]),
                scales=tuple((p, float(x)) for p, x in s.get("scales", ())),
                include_protection=bool(s.get("include_protection", False)),
                fault_constants=bool(s.get("fault_constants", False)))
        return cls(**kw)


def upgraded(spec: dict) -> dict:
    """A spec's JSON as an older onnxft wrote it, with the fields added since set to what that
    version did, so that it rebuilds (and a resumed campaign compares) as the campaign it ran.
    ``selection.fault_constants``: before it existed every arithmetic node was a site, arithmetic
    on constants only included."""
    sel = spec.get("selection")
    if isinstance(sel, dict) and "fault_constants" not in sel:
        spec = dict(spec, selection=dict(sel, fault_constants=True))
    return spec


def _plain(v):
    if isinstance(v, (OutcomeOptions, SiteSelection, InputLayout)):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, frozenset):
        return sorted(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _thaw_tuple(v):
    """Lists back to tuples (every sequence field of the spec is a tuple)."""
    return tuple(_thaw_tuple(x) for x in v) if isinstance(v, list) else v
