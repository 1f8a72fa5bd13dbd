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
    ft.ra("vit", hw="ws:128x128", method="is", budget=2000)           # Resiliency Accuracy (RA_1)
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
from .campaigns.outcomes import OutcomeOptions, outcome_options
from .campaigns.spec import CampaignSpec
from .passes.inject import SiteSelection, inject as _inject, selection_from_options
from .passes.optional_inputs import optional_fault_inputs
from .faults.sampling import DEFAULT_MAX_FAULTS
from .runtime.data import Batch, DataError, Dataset, InputLayout, fixed_batch, input_specs, load_npz, synthetic
from .passes.thresholds import DEFAULT_PRECISION
from .runtime.model_io import check_writable, external_data_dir, load_model, save_model

__all__ = ["samples", "inspect", "inject", "evaluate", "bench", "replay", "vuln", "harden", "overhead",
           "compare", "intensity", "ra", "open_store", "load", "SiteSelection", "selection_from_options", "HardenOptions", "CampaignSpec",
           "OutcomeOptions", "outcome_options", "InputLayout", "Dataset", "example_feeds",
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
             limit: int | None = None, inputs: InputLayout | None = None) -> Dataset:
    """The items to run: ``data`` (a path or a Dataset), else ``default`` (a sample's own data), checked
    against the model's inputs and batch axes (``inputs.batch_axes``; the data give the shapes)."""
    if inputs is not None and inputs.shapes:
        raise ValueError("--shape is for running without --data: the data's arrays give the shapes")
    if isinstance(data, Dataset):
        ds = data
        if not ds.batch_axes:  # built by hand: the model's batch axes (a state batched on axis 1)
            axes = {s.name: s.batch_axis for s in input_specs(model, inputs)}
            ds = Dataset(ds.inputs, ds.labels, ds.path, {k: axes.get(k, 0) for k in ds.inputs})
    else:
        path = data if data is not None else default
        if path is None:
            raise ValueError("this model has no bundled data: give --data D.npz")
        ds = load_npz(path, input_specs(model, inputs))
    if limit is not None:
        if limit < 1:
            raise ValueError("--limit must be at least 1")
        ds = ds.head(limit)
    return ds


def example_feeds(model: onnx.ModelProto, batch: int, data=None, inputs: InputLayout | None = None,
                  seed: int = 0) -> Batch:
    """One batch of inputs for inspect, inject --ber and bench: the first ``batch`` items of ``data``
    (a path or Dataset), else synthetic inputs of the shapes the model and ``inputs`` fix
    (``runtime.data.synthetic``; an unresolved dim is a one-line DataError). A model with a static
    batch axis gets exactly its batch."""
    batch = fixed_batch(input_specs(model, inputs)) or batch
    if data is not None:
        return _dataset(model, data, None, None, inputs).batch(0, batch)
    return synthetic(input_specs(model, inputs), batch, seed)


def samples() -> dict:
    return _samples.manifest()


def inspect(model, selection: SiteSelection | None = None, int_widths=(16, 32), data=None,
            inputs: InputLayout | None = None) -> dict:
    """Sites and operation counts per item, for one item of ``data`` (else synthetic inputs of the
    shapes the model and ``inputs`` fix)."""
    m, name, _ = load(model)
    info = inspect_model(m, selection, int_widths, feeds=example_feeds(m, 1, data, inputs), inputs=inputs)
    info["model"] = name
    return info


def inject(model, output: str | Path, selection: SiteSelection | None = None, int_widths=(16, 32),
           logging: bool = False, ber: float | None = None, seed: int = 0, batch: int = 1,
           faults_output: str | Path | None = None, data=None, inputs: InputLayout | None = None,
           max_faults: float | None = DEFAULT_MAX_FAULTS) -> dict:
    """Write the injection graph of ``model`` to ``output``; returns what the pass did.

    With ``ber``, also sample one fault set for the first ``batch`` items of ``data`` (else a batch
    of the shapes the model and ``inputs`` fix, see ``example_feeds``) and write it as an .npz of
    graph inputs to ``faults_output`` (default: ``<output>.faults.npz``), ready for
    ``session.run(None, {**inputs, **np.load(faults)})`` in plain onnxruntime. A BER whose expected
    flips exceed ``max_faults`` is refused before sampling.
    """
    check_writable(output)
    if ber is not None:
        if not 0.0 <= float(ber) <= 1.0:
            raise ValueError(f"BER must be in [0, 1], got {ber}")
        faults_output = Path(faults_output) if faults_output else Path(str(output) + ".faults.npz")
        check_writable(faults_output)
    m, name, _ = load(model)
    feeds = example_feeds(m, batch, data, inputs, seed) if ber is not None else None
    res = _inject(m, selection, int_widths=int_widths, logging=logging)
    # Plain onnxruntime warns about every initializer that is also an input: written fault tables
    # are optional inputs instead (passes/optional_inputs.py); sampling below runs res.model.
    written = optional_fault_inputs(res.model).model
    # A model over 2 GB keeps its weights on disk: the checker finds them only from the saved file.
    external = external_data_dir(written) is not None
    if not external:
        onnx.checker.check_model(written, full_check=True)
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
        from .runtime.session import InjectionSession

        sess = InjectionSession(res.model, "cpu")
        batch = feeds.batch_size
        plans = sess.plans(feeds)
        faults = sample_faults(plans, float(ber), trial_rng(seed, 0, 0), max_faults)
        buf = io.BytesIO()
        np.savez(buf, **fault_feeds(plans, faults))
        atomic_write(faults_output, buf.getvalue())
        info.update({"faults_output": str(faults_output), "flips": len(faults), "batch": batch})
    save_model(written, output)
    if external:
        onnx.checker.check_model(str(output), full_check=True)
    return info


def _model_fields(model, name: str) -> dict:
    """The spec's model fields: a bundled sample's name (portable), else the path ``load`` resolved
    (None for a ModelProto); and the display name."""
    if isinstance(model, onnx.ModelProto):
        path = None
    elif model is None or (_samples.sample_model_name(str(model)) and not Path(str(model)).exists()):
        path = _samples.DEFAULT_MODEL if model is None else str(model)
    else:
        path = name
    return {"model": path, "model_name": display_name(model, name)}


def evaluate(model=None, data=None, bers: Iterable[float] = (0.0, 1e-9, 1e-8, 1e-7), trials: int = 3,
             seed: int = 0, metric: str = "top1", provider: str = "auto", batch: int = 64,
             selection: SiteSelection | None = None, int_widths=(16, 32), limit: int | None = None,
             progress=None, fault_log: str | Path | None = None, threads: int | None = None,
             outputs=None, sdc: str = "auto", tol=None, inputs: InputLayout | None = None,
             max_faults: float | None = DEFAULT_MAX_FAULTS, store=None, workers: int = 1,
             ray_address: str | None = None, fault_model: str = "operation", hw: str | None = None,
             variables=None) -> EvalResult:
    """Top-1 accuracy (``metric="top1"``) or SDC rate (``"sdc"``) against BER, and the masked / SDC /
    DUE rates of every point (``campaigns.evaluate``, ``campaigns.outcomes``).

    ``outputs``: checked outputs (names, or ``"a,b"``; default every float output); ``sdc``: the
    SDC criterion (auto, top1, tol, cosine or ``package.module:function``); ``tol``: ``"rel=R,abs=A,cos=C"``
    or a dict. ``inputs``: shapes and batch axes (``--shape``, ``--batch-axis``); ``max_faults``: the
    expected flips per batch above which a BER is refused before sampling (None: no limit).
    ``store``: a ``CampaignStore`` (``open_store``) that commits every unit and, opened with
    ``resume=True``, runs only the missing ones; ``workers`` > 1 or ``ray_address``: the units run on
    Ray workers. Results are identical for any of these.

    ``fault_model="variable"`` with ``hw`` (``ws:RxC``, ``os:RxC``, ``is:RxC``, ``gpu:TMxTNxTK``,
    ``equal``): the BER is per stored bit-cycle of the GEMM/Conv weights, inputs and partial sums
    under that dataflow (docs/resiliency_accuracy.md); ``variables`` restricts the kinds hit
    (``"weight"``, ``"activation"``, ``"psum"``, comma-separated, or ``"all"``). int8 products are
    then 32 bits wide (the accumulator width of ``int_widths`` is kept)."""
    from .faults.variable import parse_variables

    kinds = parse_variables(variables)
    if fault_model == "variable":
        int_widths = (32, int(int_widths[1]))
    m, name, default = load(model)
    ds = _dataset(m, data, default, limit, inputs)
    fixed = fixed_batch(input_specs(m, inputs))
    if fixed is not None:  # a static-batch export: whole batches of exactly that size
        batch = fixed
        if len(ds) < fixed:
            raise DataError(f"the model takes batches of exactly {fixed} items; the data holds {len(ds)}")
        ds = ds.head(len(ds) - len(ds) % fixed)
    if fault_log is not None:
        check_writable(fault_log)
    spec = CampaignSpec(**_model_fields(model, name), data=ds.path, bers=tuple(float(b) for b in bers),
                        trials=trials, seed=seed, metric=metric, outcome=outcome_options(outputs, sdc, tol),
                        selection=selection or SiteSelection(), int_widths=tuple(int(w) for w in int_widths),
                        provider=provider, threads=threads, batch=batch, limit=limit,
                        inputs=inputs or InputLayout(), max_faults=max_faults, fault_model=fault_model,
                        hw=hw, variables=kinds)
    result = _evaluate(m, ds, spec, progress=progress, fault_log=fault_log, store=store, workers=workers,
                       ray_address=ray_address)
    result.extra["int_widths"] = list(int_widths)
    result.extra["path"] = name
    return result


def open_store(out_dir: str | Path, resume: bool = False):
    """The campaign store in ``out_dir`` (``campaigns.store.CampaignStore``): a new campaign, or with
    ``resume`` the one there. Close it when the campaign is done."""
    from .campaigns.store import CampaignStore

    return CampaignStore(out_dir, resume)


def bench(model, ber: float = 1e-8, batch: int = 8, provider: str = "auto", repeats: int = 20,
          seed: int = 0, data=None, threads: int | None = None, inputs: InputLayout | None = None,
          max_faults: float | None = DEFAULT_MAX_FAULTS) -> dict:
    m, name, default = load(model)
    feeds = example_feeds(m, batch, data, inputs, seed)
    out = _bench(m, ber, feeds.batch_size, provider, repeats, seed=seed, feeds=feeds, threads=threads,
                 max_faults=max_faults)
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
                                 bool(sel_opts.get("include_protection")),
                                 # a log written before the option existed faulted constant arithmetic
                                 bool(sel_opts.get("fault_constants", True))) if sel_opts else None
    out = _replay(m, ds, rec, provider, sel, int_widths=tuple(rec.get("int_widths", (16, 32))))
    out.update({"model": name, "record": record, "ber": rec["ber"], "trial": rec["trial"]})
    return out


def _calibration_data(m: onnx.ModelProto, calib, default: str | None, limit: int | None,
                      inputs: InputLayout | None = None) -> Dataset | None:
    """Calibration items: ``calib`` (first ``limit``), else the LAST ``limit`` items of a bundled
    sample's data, so that evaluations on its first items (eval --limit 1000, the README's
    figures) never see their calibration images; None when there is neither."""
    if calib is not None:
        return _dataset(m, calib, None, limit, inputs)
    if default is None:
        return None
    full = _dataset(m, None, default, None, inputs)
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
           calib_limit: int | None = 512, select: CampaignSpec | None = None, data=None, limit: int | None = None,
           progress=None, inputs: InputLayout | None = None, train=None, store=None, workers: int = 1,
           ray_address: str | None = None) -> dict:
    """Write the hardened model (range restriction + ABFT, see ``campaigns.harden``) and its plan.

    ``calib``: .npz (or Dataset) for range bounds and ABFT thresholds; a bundled sample uses its own
    data when none is given. ``select``: a ``CampaignSpec`` (target_drop, max_overhead, trials,
    max_trials, ci_width, batch, seed, provider, threads, outcome) runs Algorithm 1
    (``campaigns.select``) on ``data`` (first ``limit`` items) at ``options.ber`` to choose the
    GEMMs, then measures the chosen protection under injection. ``train``: labelled .npz (or
    Dataset) for the clip thresholds of ``options.clip`` (a ``ClipTrainOptions``; docs/proact.md); a
    bundled sample uses its bundled training subset when none is given. ``store`` (``open_store``),
    ``workers``, ``ray_address``: Algorithm 1's units are committed to the store (a resumed
    selection runs only the missing ones and takes the same steps) and run on Ray workers; the
    check of the chosen protection under injection runs on the workers too, outside the store (its
    graph depends on options the selection's spec does not hold). Returns the plan (also
    written to ``<output stem>.plan.json``)."""
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
        eval_ds = _dataset(m, data, default, limit, inputs)
        select = select.replace(**_model_fields(model, name), data=eval_ds.path, limit=limit,
                                bers=(float(options.ber),), design_ber=float(options.ber), metric="top1",
                                inputs=inputs or InputLayout())
        sel = select_gemms(m, eval_ds, select, progress, store=store, workers=workers, ray_address=ray_address)
        selection = asdict(sel)
        if not sel.chosen:
            raise ValueError("Algorithm 1 chose no GEMM (none fits under --max-overhead, or the model already "
                             "meets the target): nothing to harden")
        options = replace(options, gemms="^(" + "|".join(re.escape(c) for c in sel.chosen) + ")$",
                          block_size={c: b for c, b in sel.block_sizes.items() if b})
    res = _harden(m, options, _calibration_data(m, calib, default, calib_limit, inputs),
                  train=_train_data(m, train, default) if options.clip is not None else None)
    plan = dict(res.plan, model=name, output=str(output))
    if selection is not None:
        # the chosen protection, built for real, under injection on the same items and seeds
        real = _evaluate(res.model, eval_ds, select.replace(model=str(output), model_name=str(output)),
                         workers=workers, ray_address=ray_address)
        p = real.points[0]
        selection.update({"measured_accuracy": p.value, "measured_ci": list(p.ci), "measured_sdc": p.sdc,
                          "measured_sdc_ci": list(p.sdc_ci), "measured_due": p.due,
                          "measured_due_ci": list(p.due_ci), "spec": select.to_json()})
        plan["selection"] = selection
    save_model(res.model, output)
    from .report.outputs import atomic_write

    atomic_write(plan_path(output), json.dumps(plan, indent=2) + "\n")
    plan["plan_path"] = str(plan_path(output))
    return plan


def overhead(model, baseline, batch: int = 8, provider: str = "auto", repeats: int = 20, data=None,
             threads: int | None = None, inputs: InputLayout | None = None, per_layer: bool = False) -> dict:
    """Fault-free latency of ``model`` (e.g. a hardened graph) against ``baseline``, interleaved medians.
    ``per_layer``: also where the time goes, per protected GEMM/Conv, from onnxruntime's profile
    (``campaigns.overhead.per_layer_overhead``), under ``"per_layer"``."""
    m, name, _ = load(model)
    b, bname, default = load(baseline)
    feeds = example_feeds(b, batch, data, inputs)
    out = latency_overhead(b, m, feeds.batch_size, provider, repeats, feeds=feeds, threads=threads)
    if per_layer:
        from .campaigns.overhead import per_layer_overhead

        out["per_layer"] = per_layer_overhead(b, m, feeds.batch_size, provider, repeats, feeds=feeds,
                                              threads=threads)
    out.update({"model": name, "baseline": bname})
    return out


def intensity(model, data=None, batch: int = 8, provider: str = "cpu", threads: int | None = None,
              ridge: float | None = None, refresh_ridge: bool = False, inputs: InputLayout | None = None) -> dict:
    """Arithmetic intensity of every GEMM/Conv at its run-time shapes, the device's ridge point and
    each one's regime and ABFT implementation by seed 004's rule (``analysis.intensity``,
    ``runtime.ridge``). Shapes from the first ``batch`` items of ``data``, else synthetic inputs."""
    from .analysis.intensity import choose_impl, gemm_intensities, regime
    from .runtime.ridge import ridge_point

    m, name, _ = load(model)
    feeds = example_feeds(m, batch, data, inputs)
    batch = feeds.batch_size
    point = ridge_point(provider, threads, ridge, refresh_ridge)
    calls = []
    for c in gemm_intensities(m, feeds, provider):
        calls.append(dict(c.to_dict(), regime=regime(c.ai, point["ridge"]), impl=choose_impl(c.ai, point["ridge"])))
    return {"model": name, "batch": batch, "ridge": point, "calls": calls}


def compare(model, schemes=("none", "range", "standard", "lb", "lb+range"), bers=(1e-8, 1e-7), data=None,
            calib=None, trials: int = 2, seed: int = 0, batch: int = 250, provider: str = "auto",
            limit: int | None = None, design_ber: float | None = None, latency: bool = False,
            progress=None, threads: int | None = None, range_mode: str = "clamp",
            range_kinds=("softmax", "gelu"), alpha: float = 0.02, inject_protection: bool = False,
            fault_constants: bool = False,
            dmr=("layernorm",), target_drop: float = 0.02, max_overhead: float = 0.02, max_trials: int | None = None,
            outputs=None, sdc: str = "auto", tol=None, inputs: InputLayout | None = None,
            precision: str = DEFAULT_PRECISION, store=None, workers: int = 1, ray_address: str | None = None,
            train=None, clip_options=None, fault_model: str = "operation", hw: str | None = None,
            variables=None, abft_impl: str = "global") -> dict:
    """Accuracy, outcome rates (SDC, DUE, masked) and overhead of protection schemes side by side
    (``campaigns.compare``). ``precision``: the serving precision of the ABFT thresholds (as ``harden``);
    ``abft_impl``: how the LB schemes build each GEMM's check (as ``harden --abft-impl``).
    ``dmr``: what ``lb+range+dmr`` duplicates (``passes.dmr`` names or op types).
    ``range_mode``, ``range_kinds`` and ``alpha`` set the range restriction of ``range`` and ``lb+range``;
    ``inject_protection`` faults each scheme's protection too (checks and ABFT recovery);
    ``fault_constants`` faults arithmetic on constants only too (``SiteSelection.fault_constants``);
    ``target_drop``, ``max_overhead`` and ``max_trials`` (default max(trials, 4)) drive ``auto``
    (Algorithm 1); ``outputs``, ``sdc``, ``tol`` as ``evaluate``. ``store`` (``open_store``),
    ``workers``, ``ray_address``: every scheme's units, and ``auto``'s Algorithm 1 units (as
    ``harden(select=...)``), are committed to the store and run on the workers; a resumed compare
    runs only the missing ones and returns the uninterrupted result. ``train`` (.npz or Dataset, labelled)
    and ``clip_options`` (a ``ClipTrainOptions``; its method is set per scheme) serve the clip
    schemes; a bundled sample trains on its bundled training subset. ``fault_model``, ``hw``,
    ``variables``: the fault model of the accuracy campaigns, as ``evaluate``."""
    from .campaigns.compare import compare as _compare
    from .faults.variable import parse_variables
    from .passes.dmr import op_types_from

    kinds = parse_variables(variables)

    m, name, default = load(model)
    ds = _dataset(m, data, default, limit, inputs)
    cal = _calibration_data(m, calib, default if data is None else None, 512, inputs)
    if cal is None:  # the user's own data: calibrate on its first items
        cal = ds.head(min(512, len(ds)))
    spec = CampaignSpec(**_model_fields(model, name), data=ds.path, bers=tuple(float(b) for b in bers),
                        trials=trials, seed=seed, outcome=outcome_options(outputs, sdc, tol),
                        selection=SiteSelection(include_protection=inject_protection,
                                                fault_constants=fault_constants), provider=provider,
                        threads=threads, batch=batch, limit=limit, schemes=tuple(schemes),
                        calib=None if calib is None or isinstance(calib, Dataset) else str(calib),
                        design_ber=design_ber, range_mode=range_mode, range_kinds=tuple(range_kinds), alpha=alpha,
                        dmr=tuple(op_types_from(dmr)), latency=latency, target_drop=target_drop,
                        max_overhead=max_overhead, max_trials=max(trials, 4) if max_trials is None else max_trials,
                        ci_width=0.03, inputs=inputs or InputLayout(), precision=precision,
                        fault_model=fault_model, hw=hw, variables=kinds,
                        int_widths=(32, 32) if fault_model == "variable" else (16, 32), abft_impl=abft_impl)
    out = _compare(m, ds, spec, cal, progress, store=store, workers=workers, ray_address=ray_address,
                   train=_train_data(m, train, default), clip_options=clip_options)
    out["model"] = spec.model_name
    return out


def vuln(model=None, data=None, granularity: Iterable[str] = ("layer",), ber: float | None = None,
         target_losses: Iterable[float] = (), loss_mode: str = "relative", trials: int = 2, max_trials: int = 10,
         ci_width: float = 0.02, seed: int = 0, batch: int = 250, limit: int | None = None, provider: str = "auto",
         threads: int | None = None, patch: tuple[int, int] | None = None, progress=None, search_trials: int = 1,
         outputs=None, inputs: InputLayout | None = None, store=None, workers: int = 1,
         ray_address: str | None = None, fault_constants: bool = False) -> dict:
    """Vulnerability factors per layer/module/op type/input patch/bit (campaigns.vuln.analyse).
    ``outputs``: the scored output (the first named; default the first float output).
    ``fault_constants``: arithmetic on constants only is a site too (``SiteSelection.fault_constants``).
    ``progress(done, total)``: units done (the total grows with the BER search and the trials).
    ``store``, ``workers``, ``ray_address``: as ``evaluate`` (every unit committed; a resumed
    analysis runs only the missing ones and makes the same decisions; Ray workers)."""
    from .campaigns.vuln import analyse

    m, name, default = load(model)
    ds = _dataset(m, data, default, limit, inputs)
    if fixed_batch(input_specs(m, inputs)) is not None:
        raise DataError("vuln needs a model with a dynamic batch axis")
    spec = CampaignSpec(**_model_fields(model, name), data=ds.path, bers=() if ber is None else (float(ber),),
                        trials=trials, seed=seed, outcome=outcome_options(outputs), provider=provider,
                        threads=threads, batch=batch, limit=limit, granularity=tuple(granularity),
                        target_losses=tuple(float(x) for x in target_losses), loss_mode=loss_mode,
                        max_trials=max_trials, ci_width=ci_width, search_trials=search_trials,
                        patch=None if patch is None else (int(patch[0]), int(patch[1])), inputs=inputs or InputLayout(),
                        selection=SiteSelection(fault_constants=fault_constants))
    return analyse(m, ds, spec, progress=progress, store=store, workers=workers, ray_address=ray_address).to_dict()


def ra(model=None, data=None, hw: str | None = None, faults: int = 1, method: str = "mc",
       budget: int | None = 2000, ci_width: float | None = None, seed: int = 0, batch: int = 64,
       limit: int | None = None, provider: str = "auto", threads: int | None = None,
       selection: SiteSelection | None = None, int_widths=(16, 32), curve_bers: Iterable[float] | None = None,
       k_max: int | None = None, pilot: int | None = None, progress=None, metric: str = "top1", outputs=None,
       sdc: str = "auto", tol=None) -> dict:
    """Resiliency Accuracy (campaigns.ra): RA_k, accuracy given exactly ``faults`` faults in one
    inference, with a 95% interval. ``hw``: None for the operation-wise model, else a dataflow
    (``ws:RxC``, ``os:RxC``, ``is:RxC``, ``gpu:TMxTNxTK``) or ``equal`` for the variable-level
    model. ``method``: ``mc`` or ``is`` (importance sampling, any ``faults``). Stops at ``budget``
    inferences or at a 95% half-width of ``ci_width``.

    With ``curve_bers``: accuracy at those BERs from conditional campaigns (operation-wise model),
    ``budget`` inferences spread over k = 1..k_max; the result has ``points`` as eval's.

    Items are classified masked / SDC / DUE by the shared outcome rules (``outputs``, ``sdc``,
    ``tol`` as ``evaluate``); RA is top-1 accuracy (``metric="top1"``, a DUE item never correct) or
    ``1 - SDC - DUE`` (``metric="sdc"``, no labels needed). The SDC and DUE rates given the faults
    are reported with their intervals too."""
    from .campaigns import ra as _ra

    m, name, default = load(model)
    ds = _dataset(m, data, default, limit)
    fixed = fixed_batch(input_specs(m))
    if fixed is not None:
        batch = fixed
        ds = ds.head(len(ds) - len(ds) % fixed)
    if curve_bers is not None and hw is not None:
        raise ValueError("--curve uses the operation-wise model (no --hw): the BER is per operation bit")
    if curve_bers is not None and budget is None:
        raise ValueError("--curve needs --budget N")
    if curve_bers is not None and (ci_width is not None or method != "mc" or faults != 1):
        raise ValueError("--curve takes --budget only (it estimates every RA_k by Monte Carlo): "
                         "drop --ci-width, --method and --faults")
    if method not in _ra.METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_ra.METHODS)}")
    if method == "is" and faults < 1:
        raise ValueError("importance sampling needs at least one fault per inference (--faults >= 1)")
    space_for, hw_name = None, "op"
    if hw is not None:
        from .faults import variable as _var

        hardware = _var.parse_hw(hw)
        hw_name = str(hardware)
    elif method == "is":
        space_for = _ra.OpWiseSpace
    if hw is not None:  # int8 operand faults change products by more than 16 bits can hold
        int_widths = (32, int_widths[1])
    runner = _ra.Runner(m, ds, batch, provider, selection, int_widths, threads, outcome_options(outputs, sdc, tol),
                        metric)
    if hw is not None:
        graph = _inject(m, selection, int_widths=int_widths, transposed_weights=True).model
        reader = _var.OperandReader(graph, provider, threads)

        def variable_space(plans):
            return _var.VariableSpace(plans, hardware, reader)
        space_for = variable_space
    out = {"model": display_name(model, name), "data": ds.path, "items": len(ds), "seed": seed,
           "hw": hw_name, "clean": runner.clean, "metric": metric, "outputs": runner.judge.describe()}
    if curve_bers is not None:
        res = _ra.ra_curve(runner, list(curve_bers), budget, k_max, seed=seed, progress=progress)
        out.update({"method": "mc", "inferences": res["inferences"], "k_max": res["k_max"],
                    "bits_per_item": res["bits_per_item"], "per_k": res["per_k"],
                    "points": [{"ber": p.ber, "value": p.value, "ci": list(p.ci), "n": res["inferences"],
                                "truncation": p.truncation, "faults_per_item": p.faults_per_item}
                               for p in res["points"]]})
        return out
    est = _ra.estimate_ra(runner, space_for, faults, method, budget, ci_width, seed, hw_name, pilot,
                          progress=progress)
    out.update({"ra": est.value, "ci": list(est.ci), "inferences": est.inferences, "method": est.method,
                "ess": est.ess, "k": est.k, "pilot": est.extra.get("pilot", 0),
                "sdc": est.extra["sdc"], "sdc_ci": est.extra["sdc_ci"], "due": est.extra["due"],
                "due_ci": est.extra["due_ci"]})
    if hw is not None:
        out["skipped"] = [list(s) for s in space_for(runner.plans[0]).skipped]
    return out
