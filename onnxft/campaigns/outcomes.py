"""Outcome classes of a faulty run: masked, SDC, DUE (NVBitFI / SASSIFI), per item.

Every item of every faulty run is compared with the same item of the fault-free run of the same
injection graph (so that BER 0 gives exactly 0 SDC and 0 DUE):

- **DUE** (detected unrecoverable error): a NaN or +-Inf in any checked output, at an element that
  is finite in the fault-free run. A runtime check finds it; it is never correct, never masked.
- **SDC** (silent data corruption): finite outputs that differ from the fault-free ones by the
  criterion (``OutcomeOptions.sdc``).
- **masked**: the rest.

Checked outputs: every float output with a batch axis (axis 0, the items) by default; integer and
bool outputs are passthroughs (a text encoder's ``input_ids``) and are listed as ignored, as is an
output without a batch axis. ``OutcomeOptions.outputs`` names the checked outputs instead.

SDC criteria (see docs/outcomes.md):

- ``top1``: the arg-max along the last axis (the class axis) differs at any position of any
  checked output;
- ``tol``: any element differs by more than ``abs + rel * |clean|``;
- ``cosine``: the per-item cosine similarity of any checked output is below ``cos``;
- ``package.module:function``: a user hook ``f(faulty, clean, labels)`` taking dicts of the checked
  outputs (name -> array, items on axis 0) and the labels (or None); it returns one bool per item
  (True = SDC) or one score per item in [0, 1] (1 = as the fault-free run; SDC below ``score``);
- ``auto`` (default): ``top1`` for a classifier — exactly one checked output, of shape
  ``[batch, C]`` with C > 1 — else ``tol``.

Top-1 accuracy (``--metric top1``) scores the first checked output (one class vector per item,
arg-max against the label); a DUE item is never correct.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

MASKED, SDC, DUE = 0, 1, 2
OUTCOME_NAMES = ("masked", "sdc", "due")  # index = outcome code (fault-log records carry the codes)
SDC_CRITERIA = ("auto", "top1", "tol", "cosine")
TOLERANCE_KEYS = ("rel", "abs", "cos", "score")


class OutcomeError(ValueError):
    """A user-facing problem with the outcome options (an unknown output, a bad hook)."""


@dataclass(frozen=True)
class OutcomeOptions:
    """What is checked and what counts as SDC (see the module docstring)."""

    outputs: tuple[str, ...] = ()  # checked outputs; empty: every float output
    sdc: str = "auto"  # auto | top1 | tol | cosine | package.module:function
    rel: float = 1e-3  # tol: relative tolerance
    abs: float = 1e-5  # tol: absolute tolerance
    cos: float = 0.999  # cosine: SDC below this similarity
    score: float = 1.0  # hook scores: SDC below this score

    def validate(self) -> None:
        if self.sdc not in SDC_CRITERIA and ":" not in self.sdc:
            raise OutcomeError(f"unknown --sdc {self.sdc!r}; choose from {', '.join(SDC_CRITERIA)} "
                               "or give a hook as package.module:function")
        if ":" in self.sdc:
            load_hook(self.sdc)  # a hook that does not load is an argument mistake: say so before any work
        for key in TOLERANCE_KEYS:
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise OutcomeError(f"--tol {key} must be a number >= 0, got {v}")


def parse_tol(text: str | Mapping | None) -> dict[str, float]:
    """``"rel=1e-3,abs=1e-5"`` (or a mapping) -> {"rel": 0.001, "abs": 1e-05}."""
    if text is None:
        return {}
    items = text.items() if isinstance(text, Mapping) else \
        [part.partition("=")[::2] for part in str(text).split(",") if part.strip()]
    out = {}
    for key, value in items:
        key = str(key).strip()
        if key not in TOLERANCE_KEYS:
            raise OutcomeError(f"--tol: unknown key {key!r}; expected {', '.join(k + '=X' for k in TOLERANCE_KEYS)}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise OutcomeError(f"--tol {key}: {value!r} is not a number") from None
    return out


def outcome_options(outputs=None, sdc: str = "auto", tol: str | Mapping | None = None) -> OutcomeOptions:
    """OutcomeOptions from the CLI/API spelling: ``outputs`` a list or ``"a,b"``, ``tol`` as ``parse_tol``."""
    if isinstance(outputs, str):
        outputs = [o.strip() for o in outputs.split(",") if o.strip()]
    opts = OutcomeOptions(outputs=tuple(outputs or ()), sdc=str(sdc), **parse_tol(tol))
    opts.validate()
    return opts


def load_hook(spec: str) -> Callable:
    """The function named ``package.module:function``; a module in the current directory is found
    too (the ``onnxft`` script's own directory, not the user's, heads ``sys.path``)."""
    import os
    import sys

    module, _, name = spec.partition(":")
    try:
        if os.getcwd() not in sys.path and importlib.util.find_spec(module.split(".")[0]) is None:
            sys.path.append(os.getcwd())
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OutcomeError(f"cannot load the --sdc hook {spec!r} ({exc.__class__.__name__}: {exc})") from None
    if not callable(fn):
        raise OutcomeError(f"the --sdc hook {spec!r} is not callable")
    return fn


def _per_item(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


def output_batch_axes(run, data, names: list[str]) -> dict[str, int | None]:
    """Each output's batch axis, found by running the first item alone and the first two items:
    the axis whose size follows the item count (None: no such axis, e.g. a configuration output).
    Declared shapes cannot tell (a recurrent state ``[2, batch, 128]`` comes out batched on axis 1,
    exporters often name no output dim), a two-run probe always can. ``run(feeds)`` returns the
    outputs in ``names`` order; ``data`` is a ``Dataset``. With fewer than two items: {} (axis 0)."""
    if len(data) < 2:
        return {}
    try:
        one, two = run(data.batch(0, 1)), run(data.batch(0, 2))
    except Exception:  # a model exported for a fixed batch takes no other item count: axis 0, as declared
        return {}
    axes = {}
    for name, a, b in zip(names, one, two):
        sa, sb = np.shape(a), np.shape(b)
        moved = [k for k in range(min(len(sa), len(sb))) if sa[k] == 1 and sb[k] == 2] if len(sa) == len(sb) else []
        axes[name] = moved[0] if moved else None
    return axes


class Judge:
    """Classifies the items of faulty runs of one injection graph.

    Built from the graph's output names and one fault-free batch (their dtypes and shapes decide
    which outputs are checked and, for ``auto``, the criterion)."""

    def __init__(self, names: list[str], clean: list[np.ndarray], options: OutcomeOptions | None = None,
                 items: int | None = None, axes: dict | None = None):
        options = options or OutcomeOptions()
        options.validate()
        self.options = options
        batch = items if items is not None else _batch_size(clean)
        self.checked: list[int] = []
        self.axes: dict[int, int] = {}  # checked output -> its batch axis (moved to the front when judged)
        self.ignored: list[dict] = []
        for i, (name, arr) in enumerate(zip(names, clean)):
            arr = np.asarray(arr)
            axis = (axes or {}).get(name, 0 if arr.ndim and len(arr) == batch else None)
            if not np.issubdtype(arr.dtype, np.floating):
                reason = f"{arr.dtype}: passthrough"
            elif axis is None or arr.ndim == 0 or arr.shape[axis] != batch:
                reason = "no batch axis"
            else:
                reason = None
            if options.outputs and name in options.outputs:
                if reason is not None:
                    raise OutcomeError(f"--output {name}: cannot be checked ({reason}); "
                                       "only float outputs with a batch axis are")
                self.checked.append(i)
                self.axes[i] = axis
            elif reason is None and not options.outputs:
                self.checked.append(i)
                self.axes[i] = axis
            else:
                self.ignored.append({"name": name, "reason": reason or "not selected (--output)"})
        unknown = [o for o in options.outputs if o not in names]
        if unknown:
            raise OutcomeError(f"--output: unknown output(s) {', '.join(unknown)}; the model's outputs: "
                               f"{', '.join(names)}")
        if not self.checked:
            raise OutcomeError("no float output to check (outputs: "
                               + ", ".join(f"{d['name']} ({d['reason']})" for d in self.ignored) + ")")
        self.names = [names[i] for i in self.checked]
        self.criterion = options.sdc
        if self.criterion == "auto":
            only = np.moveaxis(np.asarray(clean[self.checked[0]]), self.axes[self.checked[0]], 0)
            self.criterion = "top1" if len(self.checked) == 1 and only.ndim == 2 and only.shape[1] > 1 else "tol"
        if self.criterion == "top1":
            for i in self.checked:
                if np.ndim(clean[i]) < 2 or np.shape(clean[i])[-1] < 2 or self.axes[i] == np.ndim(clean[i]) - 1:
                    raise OutcomeError(f"--sdc top1: output {names[i]} has shape {list(np.shape(clean[i]))}, "
                                       "no class axis (last axis of size > 1); use --sdc tol")
        self.hook = load_hook(self.criterion) if ":" in self.criterion else None

    def describe(self) -> dict:
        return {"checked": self.names, "ignored": self.ignored, "sdc_criterion": self.criterion}

    def _pick(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        """The checked outputs with their batch axis first."""
        return [np.moveaxis(np.asarray(outs[i]), self.axes[i], 0) for i in self.checked]

    def due(self, outs: list[np.ndarray], clean: list[np.ndarray] | None = None) -> np.ndarray:
        """Items with a NaN or Inf in a checked output where the fault-free output is finite."""
        outs = self._pick(outs)
        bad = np.zeros(len(outs[0]), bool)
        refs = self._pick(clean) if clean is not None else [None] * len(outs)
        for f, c in zip(outs, refs):
            nonfinite = ~np.isfinite(_per_item(f))
            if c is not None:
                nonfinite &= np.isfinite(_per_item(c))
            bad |= nonfinite.any(axis=1)
        return bad

    def _sdc(self, outs, clean, labels) -> np.ndarray:
        f_all, c_all = self._pick(outs), self._pick(clean)
        sdc = np.zeros(len(f_all[0]), bool)
        if self.hook is not None:
            return self._run_hook(f_all, c_all, labels)
        o = self.options
        for f, c in zip(f_all, c_all):
            if self.criterion == "top1":
                sdc |= (_per_item(np.argmax(f, axis=-1)) != _per_item(np.argmax(c, axis=-1))).any(axis=1)
            elif self.criterion == "tol":
                with np.errstate(invalid="ignore"):  # (a flipped bit can make a signalling NaN: casting it is "invalid")
                    f64, c64 = _per_item(f).astype(np.float64), _per_item(c).astype(np.float64)
                    sdc |= (np.abs(f64 - c64) > o.abs + o.rel * np.abs(c64)).any(axis=1)
            else:  # cosine
                sdc |= cosine_similarity(f, c) < o.cos
        return sdc

    def _run_hook(self, faulty, clean, labels) -> np.ndarray:
        n = len(faulty[0])
        with np.errstate(invalid="ignore", over="ignore"):  # (signalling NaNs and huge values from flipped bits)
            got = np.asarray(self.hook(dict(zip(self.names, faulty)), dict(zip(self.names, clean)), labels))
        if got.shape != (n,):
            raise OutcomeError(f"the --sdc hook {self.criterion} returned shape {list(got.shape)}; "
                               f"expected one value per item ({n})")
        if got.dtype == np.bool_:
            return got
        if not np.issubdtype(got.dtype, np.number):
            raise OutcomeError(f"the --sdc hook {self.criterion} returned {got.dtype}; expected bools or scores")
        return np.asarray(got, np.float64) < self.options.score

    def classify(self, outs: list[np.ndarray], clean: list[np.ndarray], labels=None) -> np.ndarray:
        """Outcome code (MASKED, SDC, DUE) of each item of a faulty run against the fault-free one."""
        due = self.due(outs, clean)
        codes = np.where(self._sdc(outs, clean, labels), SDC, MASKED).astype(np.int8)
        codes[due] = DUE
        return codes

    def predictions(self, outs: list[np.ndarray]) -> np.ndarray:
        """Class of each item from the first checked output (one class vector per item)."""
        scored = np.asarray(outs[self.checked[0]])
        if scored.ndim < 2 or scored[0].size != scored.shape[-1]:
            raise OutcomeError(f"top-1 accuracy needs one class vector per item; output {self.names[0]} has shape "
                               f"{list(scored.shape)} (use --metric sdc, or --output to choose the scores)")
        return np.argmax(_per_item(scored), axis=1)

    def correct(self, outs: list[np.ndarray], labels: np.ndarray, clean: list[np.ndarray] | None = None) -> np.ndarray:
        """Top-1 correct items; a DUE item (NaN/Inf) is never correct."""
        return (self.predictions(outs) == np.asarray(labels)) & ~self.due(outs, clean)


def _batch_size(outs: list[np.ndarray]) -> int | None:
    """The item count: the most common leading dim among the outputs of rank >= 1."""
    dims = [np.shape(a)[0] for a in outs if np.ndim(a) > 0]
    return max(set(dims), key=dims.count) if dims else None


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-item cosine similarity (two all-zero items are similar: 1)."""
    with np.errstate(invalid="ignore", over="ignore"):  # (signalling NaNs from flipped bits, overflow)
        a, b = _per_item(np.asarray(a)).astype(np.float64), _per_item(np.asarray(b)).astype(np.float64)
        dot = np.sum(a * b, axis=1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        sim = dot / (na * nb)
    both_zero = (na == 0) & (nb == 0)
    sim = np.where(both_zero, 1.0, np.where((na == 0) | (nb == 0), 0.0, sim))
    return np.nan_to_num(sim, nan=-1.0)


@dataclass
class OutcomeCounts:
    """Outcome counts over items x trials at one BER."""

    masked: int = 0
    sdc: int = 0
    due: int = 0

    def add(self, codes: np.ndarray) -> None:
        self.masked += int(np.sum(codes == MASKED))
        self.sdc += int(np.sum(codes == SDC))
        self.due += int(np.sum(codes == DUE))

    @property
    def n(self) -> int:
        return self.masked + self.sdc + self.due

    def rates(self) -> dict:
        """``sdc``, ``due``, ``masked`` rates with Wilson 95% intervals ``sdc_ci``, ``due_ci``."""
        from .stats import wilson_interval

        n = self.n
        r = (lambda k: k / n if n else 0.0)
        return {"sdc": r(self.sdc), "due": r(self.due), "masked": r(self.masked),
                "sdc_ci": list(wilson_interval(self.sdc, n)), "due_ci": list(wilson_interval(self.due, n))}
