"""Python twins of the CLI verbs. Each takes paths or ModelProtos and returns plain data.

    import onnxft.api as ft
    ft.samples()                                   # bundled models and data
    ft.inspect("model.onnx")                       # sites, operation counts, GEMM shapes
    ft.inject("model.onnx", "model.inject.onnx")   # write the injection graph
    r = ft.evaluate(bers=[1e-9, 1e-8], trials=3)   # accuracy vs BER on the bundled ViT
    ft.bench("model.onnx", ber=1e-8, batch=8)      # clean vs injected time
    ft.replay("faults.jsonl", record=0)            # re-run one logged trial
    ft.harden("model.onnx", "model.hardened.onnx", calib="calib.npz")   # LB-ABFT + range restriction
    ft.overhead("model.hardened.onnx", baseline="model.onnx")           # fault-free latency ratio
    ft.harden("resnet", "r.onnx", ft.HardenOptions(abft="none", range_mode="none",
              clip=ft.ClipTrainOptions(method="proact")))                # ProAct clipped activations
    ft.vuln("vit", granularity=["layer", "module"], target_losses=[0.1])   # vulnerability factors
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import onnx

from . import samples as _samples
from .campaigns.bench import bench as _bench
from .campaigns.evaluate import EvalResult
from .campaigns.evaluate import evaluate as _evaluate
from .campaigns.evaluate import replay as _replay
from .campaigns.harden import HardenOptions
from .campaigns.train_clip import ClipTrainOptions
from .campaigns.harden import harden as _harden
from .campaigns.overhead import latency_overhead
from .campaigns.inspect import inspect_model
from .passes.inject import SiteSelection, inject as _inject, selection_from_options
from .runtime.data import DataError, Dataset, fixed_batch, input_specs, load_npz
from .runtime.model_io import check_writable, external_data_dir, load_model, save_model

__all__ = ["samples", "inspect", "inject", "evaluate", "bench", "replay", "vuln", "harden", "overhead",
           "compare", "load", "SiteSelection", "selection_from_options", "HardenOptions",
           "ClipTrainOptions"]


def load(model: str | Path | onnx.ModelProto | None) -> tuple[onnx.ModelProto, str, str | None]:
    """(model, display name, default data path) for a path, a sample name, a ModelProto or None."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model", None
    path, data = _samples.resolve_model(None if model is None else str(model))
    return load_model(path), str(path), data


def display_name(arg, path: str) -> str:
    """Short label for tables and plots: the sample name, or the file name."""
    if arg is None:
        return _samples.DEFAULT_MODEL
    if isinstance(arg, onnx.ModelProto):
        return path
    return str(arg) if _samples.sample_model_name(str(arg)) else Path(path).name


def _dataset(model: onnx.ModelProto, data: str | Path | Dataset | None, default: str | None,
             limit: int | None = None) -> Dataset:
    if isinstance(data, Dataset):
        ds = data
    else:
        path = data if data is not None else default
        if path is None:
            raise ValueError("this model has no bundled data: give --data D.npz")
        ds = load_npz(path, input_specs(model))
    if limit is not None:
        if limit < 1:
            raise ValueError("--limit must be at least 1")
        ds = ds.head(limit)
    return ds


def samples() -> dict:
    return _samples.manifest()


def inspect(model, selection: SiteSelection | None = None, int_widths=(16, 32)) -> dict:
    m, name, _ = load(model)
    info = inspect_model(m, selection, int_widths)
    info["model"] = name
    return info


def inject(model, output: str | Path, selection: SiteSelection | None = None, int_widths=(16, 32),
           logging: bool = False, ber: float | None = None, seed: int = 0, batch: int = 1,
           faults_output: str | Path | None = None) -> dict:
    """Write the injection graph of ``model`` to ``output``; returns what the pass did.

    With ``ber``, also sample one fault set for a batch of ``batch`` items of the model's input
    shapes (dynamic non-batch axes: 16) and write it as an .npz of graph inputs to
    ``faults_output`` (default: ``<output>.faults.npz``), ready for
    ``session.run(None, {**inputs, **np.load(faults)})`` in plain onnxruntime.
    """
    check_writable(output)
    if ber is not None:
        if not 0.0 <= float(ber) <= 1.0:
            raise ValueError(f"BER must be in [0, 1], got {ber}")
        faults_output = Path(faults_output) if faults_output else Path(str(output) + ".faults.npz")
        check_writable(faults_output)
    m, name, _ = load(model)
    res = _inject(m, selection, int_widths=int_widths, logging=logging)
    # A model over 2 GB keeps its weights on disk: the checker finds them only from the saved file.
    external = external_data_dir(res.model) is not None
    if not external:
        onnx.checker.check_model(res.model, full_check=True)
    from .faults.sites import SiteTable

    table = SiteTable.from_model(res.model)
    info = {"model": name, "output": str(output), "sites": len(table.sites),
            "inserted": res.inserted, "skipped": res.skipped}
    if ber is not None:
        import io

        import numpy as np

        from .campaigns.evaluate import trial_rng
        from .faults.sampling import fault_feeds, sample_faults
        from .report.outputs import atomic_write
        from .runtime.data import synthetic
        from .runtime.session import InjectionSession

        sess = InjectionSession(res.model, "cpu")
        batch = fixed_batch(input_specs(m)) or batch
        plans = sess.plans(synthetic(input_specs(m), batch, seed))
        faults = sample_faults(plans, float(ber), trial_rng(seed, 0, 0))
        buf = io.BytesIO()
        np.savez(buf, **fault_feeds(plans, faults))
        atomic_write(faults_output, buf.getvalue())
        info.update({"faults_output": str(faults_output), "flips": len(faults), "batch": batch})
    save_model(res.model, output)
    if external:
        onnx.checker.check_model(str(output), full_check=True)
    return info


def evaluate(model=None, data=None, bers: Iterable[float] = (0.0, 1e-9, 1e-8, 1e-7), trials: int = 3,
             seed: int = 0, metric: str = "top1", provider: str = "auto", batch: int = 64,
             selection: SiteSelection | None = None, int_widths=(16, 32), limit: int | None = None,
             progress=None, fault_log: str | Path | None = None, threads: int | None = None) -> EvalResult:
    m, name, default = load(model)
    ds = _dataset(m, data, default, limit)
    fixed = fixed_batch(input_specs(m))
    if fixed is not None:  # a static-batch export: whole batches of exactly that size
        batch = fixed
        if len(ds) < fixed:
            raise DataError(f"the model takes batches of exactly {fixed} items; the data holds {len(ds)}")
        ds = ds.head(len(ds) - len(ds) % fixed)
    if fault_log is not None:
        check_writable(fault_log)
    result = _evaluate(m, ds, list(bers), trials, seed, metric, provider, batch, selection, int_widths,
                       name, progress, fault_log, threads)
    result.extra["int_widths"] = list(int_widths)
    result.extra["path"] = name
    result.model = display_name(model, name)
    return result


def bench(model, ber: float = 1e-8, batch: int = 8, provider: str = "auto", repeats: int = 20,
          seed: int = 0, data=None, threads: int | None = None) -> dict:
    m, name, default = load(model)
    batch = fixed_batch(input_specs(m)) or batch
    feeds = None
    if data is not None:
        ds = _dataset(m, data, None)
        feeds = ds.batch(0, batch)
    out = _bench(m, ber, batch, provider, repeats, seed=seed, feeds=feeds, threads=threads)
    out["model"] = name
    return out


def replay(log: str | Path, record: int = 0, model=None, data=None, provider: str = "cpu") -> dict:
    lines = Path(log).read_text().splitlines() if Path(log).is_file() else None
    if lines is None:
        raise ValueError(f"fault log not found: {log}")
    if not 0 <= record < len(lines):
        raise ValueError(f"record {record} is out of range: the log holds {len(lines)} records")
    rec = json.loads(lines[record])
    m, name, default = load(model if model is not None else rec["model"])
    ds = _dataset(m, data if data is not None else rec.get("data"), default)
    sel_opts = rec.get("selection") or {}
    sel = selection_from_options(sel_opts.get("op_types"), sel_opts.get("names"), sel_opts.get("formats"),
                                 [tuple(x) for x in sel_opts.get("scales", [])],
                                 bool(sel_opts.get("include_protection"))) if sel_opts else None
    out = _replay(m, ds, rec, provider, sel, int_widths=tuple(rec.get("int_widths", (16, 32))))
    out.update({"model": name, "record": record, "ber": rec["ber"], "trial": rec["trial"]})
    return out


def _calibration_data(m: onnx.ModelProto, calib, default: str | None, limit: int | None) -> Dataset | None:
    """Calibration items: ``calib`` (first ``limit``), else the LAST ``limit`` items of a bundled
    sample's data, so that evaluations on its first items (eval --limit 1000, the README's
    figures) never see their calibration images; None when there is neither."""
    if calib is not None:
        return _dataset(m, calib, None, limit)
    if default is None:
        return None
    full = _dataset(m, None, default)
    return full.tail(min(limit or len(full), len(full)))


def _train_data(m: onnx.ModelProto, train, default: str | None) -> Dataset | None:
    """Items to train clip thresholds on: ``train``, else a bundled sample's training subset
    (distinct from its test data), else None (harden then falls back to the calibration data)."""
    if train is not None:
        return _dataset(m, train, None)
    if default is not None and _samples.sample_train_path() is not None:
        return _dataset(m, _samples.sample_train_path(), None)
    return None


def default_hardened_path(model) -> Path:
    """``model.onnx`` -> ``model.hardened.onnx`` beside it; a sample name -> ``./<name>.hardened.onnx``."""
    if isinstance(model, onnx.ModelProto) or model is None:
        return Path(f"{_samples.DEFAULT_MODEL if model is None else (model.graph.name or 'model')}.hardened.onnx")
    p = Path(str(model))
    if _samples.sample_model_name(str(model)) and not p.exists():
        return Path(f"{model}.hardened.onnx")
    return p.with_name(p.stem + ".hardened.onnx")


def plan_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".plan.json")


def harden(model, output: str | Path | None = None, options: HardenOptions | None = None, calib=None,
           calib_limit: int | None = 512, select=None, data=None, limit: int | None = None,
           progress=None, train=None) -> dict:
    """Write the hardened model (range restriction + ABFT, see ``campaigns.harden``) and its plan.

    ``calib``: .npz (or Dataset) for range bounds and ABFT thresholds; a bundled sample uses its own
    data when none is given. ``select``: a ``SelectOptions`` runs Algorithm 1 (``campaigns.select``)
    on ``data`` (first ``limit`` items) at ``options.ber`` to choose the GEMMs, then measures the
    chosen protection under injection. ``train``: labelled .npz (or Dataset) for the clip thresholds
    of ``options.clip`` (a ``ClipTrainOptions``; docs/proact.md); a bundled sample uses its bundled
    training subset when none is given. Returns the plan (also written to ``<output stem>.plan.json``)."""
    options = options or HardenOptions()
    options.validate()
    output = Path(output) if output is not None else default_hardened_path(model)
    check_writable(output)
    check_writable(plan_path(output))
    m, name, default = load(model)
    selection = None
    if select is not None:
        from dataclasses import asdict, replace
        import re

        from .campaigns.select import select_gemms

        if options.abft != "lb":
            raise ValueError("--select auto chooses GEMMs for LB-ABFT: use --abft lb")
        eval_ds = _dataset(m, data, default, limit)
        sel = select_gemms(m, eval_ds, options.ber, select, progress)
        selection = asdict(sel)
        if not sel.chosen:
            raise ValueError("Algorithm 1 chose no GEMM (none fits under --max-overhead, or the model already "
                             "meets the target): nothing to harden")
        options = replace(options, gemms="^(" + "|".join(re.escape(c) for c in sel.chosen) + ")$",
                          block_size={c: b for c, b in sel.block_sizes.items() if b})
    res = _harden(m, options, _calibration_data(m, calib, default, calib_limit),
                  train=_train_data(m, train, default) if options.clip is not None else None)
    plan = dict(res.plan, model=name, output=str(output))
    if selection is not None:
        # the chosen protection, built for real, under injection on the same items and seeds
        real = _evaluate(res.model, eval_ds, [options.ber], select.trials, select.seed, "top1", select.provider,
                         select.batch, model_name=str(output), threads=select.threads)
        selection["measured_accuracy"] = real.points[0].value
        selection["measured_ci"] = list(real.points[0].ci)
        plan["selection"] = selection
    save_model(res.model, output)
    from .report.outputs import atomic_write

    atomic_write(plan_path(output), json.dumps(plan, indent=2) + "\n")
    plan["plan_path"] = str(plan_path(output))
    return plan


def overhead(model, baseline, batch: int = 8, provider: str = "auto", repeats: int = 20, data=None,
             threads: int | None = None) -> dict:
    """Fault-free latency of ``model`` (e.g. a hardened graph) against ``baseline``, interleaved medians."""
    m, name, _ = load(model)
    b, bname, default = load(baseline)
    batch = fixed_batch(input_specs(b)) or batch
    feeds = _dataset(b, data, None).batch(0, batch) if data is not None else None
    out = latency_overhead(b, m, batch, provider, repeats, feeds=feeds, threads=threads)
    out.update({"model": name, "baseline": bname})
    return out


def compare(model, schemes=("none", "range", "standard", "lb", "lb+range"), bers=(1e-8, 1e-7), data=None,
            calib=None, trials: int = 2, seed: int = 0, batch: int = 250, provider: str = "auto",
            limit: int | None = None, design_ber: float | None = None, select=None, latency: bool = False,
            progress=None, threads: int | None = None, range_mode: str = "clamp",
            range_kinds=("softmax", "gelu"), alpha: float = 0.02, inject_protection: bool = False,
            dmr=("layernorm",), train=None, clip_options=None) -> dict:
    """Accuracy and overhead of protection schemes side by side (``campaigns.compare``).
    ``dmr``: what ``lb+range+dmr`` duplicates (``passes.dmr`` names or op types).
    ``range_mode``, ``range_kinds`` and ``alpha`` set the range restriction of ``range`` and ``lb+range``;
    ``inject_protection`` faults each scheme's protection too (checks and ABFT recovery).
    ``train`` (.npz or Dataset, labelled) and ``clip_options`` (a ``ClipTrainOptions``; its method
    is set per scheme) serve the clip schemes; a bundled sample trains on its bundled training subset."""
    from .campaigns.compare import compare as _compare
    from .passes.dmr import op_types_from

    m, name, default = load(model)
    ds = _dataset(m, data, default, limit)
    cal = _calibration_data(m, calib, default if data is None else None, 512)
    if cal is None:  # the user's own data: calibrate on its first items
        cal = ds.head(min(512, len(ds)))
    out = _compare(m, ds, list(schemes), list(bers), trials, seed, batch, provider, cal, design_ber, select,
                   latency, progress, threads, range_mode, tuple(range_kinds), alpha, inject_protection,
                   op_types_from(dmr), train=_train_data(m, train, default), clip_options=clip_options)
    out["model"] = display_name(model, name)
    return out


def vuln(model=None, data=None, granularity: Iterable[str] = ("layer",), ber: float | None = None,
         target_losses: Iterable[float] = (), loss_mode: str = "relative", trials: int = 2, max_trials: int = 10,
         ci_width: float = 0.02, seed: int = 0, batch: int = 250, limit: int | None = None, provider: str = "auto",
         threads: int | None = None, patch: tuple[int, int] | None = None, progress=None) -> dict:
    """Vulnerability factors per layer/module/op type/input patch/bit (campaigns.vuln.analyse)."""
    from .campaigns.vuln import analyse

    m, name, default = load(model)
    ds = _dataset(m, data, default, limit)
    if fixed_batch(input_specs(m)) is not None:
        raise DataError("vuln needs a model with a dynamic batch axis")
    res = analyse(m, ds, list(granularity), ber, list(target_losses), loss_mode, trials, max_trials, ci_width,
                  seed, batch, provider, threads, patch=patch, model_name=display_name(model, name),
                  progress=progress)
    return res.to_dict()
