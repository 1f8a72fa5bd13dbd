"""The ``onnxft`` command line: thin verbs over ``onnxft.api``.

User mistakes end with one line on stderr (``onnxft: error: …``) and exit status 1 (2 for a bad
option), never a traceback.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from .. import api
from ..passes.inject import InjectError
from .inputs import input_layout, input_options, max_faults_option, parse_max_faults

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError, InjectError)


class UserError(click.ClickException):
    exit_code = 1


def _bers(text: str, hint: str = "--ber") -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number", param_hint=hint) from None
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise click.BadParameter(f"{part} is outside [0, 1]", param_hint=hint)
        out.append(v)
    if not out:
        raise click.BadParameter("give at least one BER", param_hint=hint)
    return out


def _one_ber(text: str, hint: str = "--ber") -> float:
    values = _bers(text, hint)
    if len(values) != 1:
        raise click.BadParameter("give one BER", param_hint=hint)
    return values[0]


def _widths(text: str) -> tuple[int, int]:
    try:
        p, a = (int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter("expected PRODUCT,ACCUM bits, e.g. 16,32 or 8,8", param_hint="--int-widths") from None
    return p, a


def _scales(values) -> tuple[tuple[str, float], ...]:
    out = []
    for v in values:
        pattern, _, s = v.rpartition("=")
        try:
            scale = float(s)
        except ValueError:
            scale = float("nan")
        if not pattern or math.isnan(scale) or scale < 0:
            raise click.BadParameter(f"{v!r}: expected REGEX=SCALE with SCALE >= 0", param_hint="--scale")
        out.append((pattern, scale))
    return tuple(out)


def campaign_run_options(f):
    """--resume, --workers, --ray-address: how a campaign runs (campaigns.store, campaigns.workers)."""
    f = click.option("--ray-address", default=None,
                     help="Run the units on this Ray cluster (e.g. auto, or HOST:6379 of `ray start --head`).")(f)
    f = click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Units run on N Ray workers (a local cluster onnxft starts and stops).")(f)
    f = click.option("--resume", default=None, type=click.Path(file_okay=False),
                     help="Continue the campaign stored in DIR (same options; only missing units run).")(f)
    return f


def campaign_out_dir(out_dir, resume, workers, ray_address, flag: str = "--out"):
    """The folder of the campaign's store and outputs: ``flag`` (--out), or --resume's (they must agree)."""
    if resume is not None:
        if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
            raise ValueError(f"--resume {resume} writes its results there: drop {flag} {out_dir} or make it the same")
        out_dir = resume
    if (workers > 1 or ray_address) and not _has_ray():
        from ..campaigns.workers import RAY_HINT

        raise ValueError(RAY_HINT)
    if out_dir is not None:
        _check_out_dir(out_dir, flag)
    return out_dir


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def site_options(f):
    """Shared options choosing the fault sites."""
    f = click.option("--sites", "names", default=None, help="Regex on node names: only matching nodes are sites.")(f)
    f = click.option("--op-types", default=None, help="Comma-separated op types to fault (e.g. MatMul,Softmax).")(f)
    f = click.option("--format", "formats", default=None, help="Comma-separated formats: fp32,fp16,int8.")(f)
    f = click.option("--scale", "scales", multiple=True,
                     help="REGEX=SCALE: multiply the BER of matching sites (0 = perfectly protected). Repeatable.")(f)
    f = click.option("--int-widths", default="16,32", show_default=True,
                     help="Bits of int8 products and accumulators (8,8 mirrors the seed paper).")(f)
    f = fault_constants_option(f)
    return f


def fault_constants_option(f):
    """--fault-constants: arithmetic on constants only is a site too (SiteSelection.fault_constants)."""
    return click.option("--fault-constants", is_flag=True,
                        help="Also fault arithmetic on constants only (weight dequantisation and the like), which "
                             "a runtime folds at load: by default it is not a site (docs/fault_model.md).")(f)


def fault_model_options(f):
    """--fault-model, --hw, --variables: which fault model a campaign's BER applies to."""
    f = click.option("--variables", default=None,
                     help="--fault-model variable: kinds hit, comma-separated weight,activation,psum or all "
                          "(default all).")(f)
    f = click.option("--hw", default=None,
                     help="--fault-model variable: ws:RxC, os:RxC, is:RxC, gpu:TMxTNxTK or equal.")(f)
    f = click.option("--fault-model", type=click.Choice(["operation", "variable"]), default="operation",
                     show_default=True,
                     help="operation: BER per (operation, bit); variable: BER per stored bit-cycle of GEMM/Conv "
                          "weights, activations and partial sums under --hw (docs/resiliency_accuracy.md).")(f)
    return f


def outcome_cli_options(f):
    """Shared options choosing the checked outputs and the SDC criterion (campaigns.outcomes)."""
    f = click.option("--tol", default=None,
                     help="Tolerances: rel=R,abs=A (--sdc tol; default rel=1e-3,abs=1e-5), cos=C (--sdc cosine; "
                          "default 0.999), score=S (hook scores; default 1).")(f)
    f = click.option("--sdc", default="auto", show_default=True,
                     help="SDC criterion: top1 (arg-max of the last axis changed), tol, cosine, or a hook "
                          "package.module:function; auto = top1 for a classifier ([batch, C] output), else tol.")(f)
    f = click.option("--output", "outputs", default=None,
                     help="Comma-separated outputs to check (default: every float output; int/bool are ignored).")(f)
    return f


def _selection(names, op_types, formats, scales, include_protection=False, fault_constants=False):
    return _run(
        api.selection_from_options,
        op_types=[t.strip() for t in op_types.split(",")] if op_types else None, names=names,
        formats=[t.strip() for t in formats.split(",")] if formats else None, scales=_scales(scales),
        include_protection=include_protection, fault_constants=fault_constants)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except click.ClickException:
        raise
    except USER_ERRORS as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(msg) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxft")
def cli():
    """onnxft: exact bit-flip fault injection for ONNX models."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def samples(as_json):
    """List the bundled sample models and data, with their clean accuracies."""
    info = _run(api.samples)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    d = info["dataset"]
    click.echo(f"data: {d['path']}  ({d.get('n', '?')} labelled images, {d.get('name', '')})")
    t = info.get("train_dataset")
    if t:
        click.echo(f"train: {t['path']}  ({t.get('n', '?')} labelled training images, for harden --clip)")
    for m in info["models"]:
        click.echo(f"{m['name']:<12} {m['format']:<5} top-1 {m['clean_top1']:.4f}  {m['path']}")


@cli.command()
@click.argument("model")
@site_options
@click.option("--data", default=None, help="Count on the first item of this .npz (its shapes).")
@input_options()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every site).")
def inspect(model, names, op_types, formats, scales, int_widths, fault_constants, data, shapes, batch_axes, as_json):
    """Fault sites of MODEL: operation counts, GEMM shapes and totals (for one item)."""
    sel = _selection(names, op_types, formats, scales, fault_constants=fault_constants)
    layout = input_layout(shapes, batch_axes)
    _run(_check_inputs, [model], data, layout)
    info = _run(api.inspect, model, sel, _widths(int_widths), data, layout)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        from ..campaigns.inspect import inspect_table

        click.echo(inspect_table(info, limit=40))


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the graph.")
@click.option("--ber", default=None, help="Also sample one fault set at this BER (written beside the graph).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that fault set.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Items in that fault set.")
@click.option("--faults-out", default=None, type=click.Path(dir_okay=False),
              help="Where to write the fault set (default: OUTPUT.faults.npz).")
@click.option("--log/--no-log", "logging", default=False, help="Add per-site fault-log outputs.")
@click.option("--data", default=None, help="With --ber: the fault set is for the first --batch items of this .npz.")
@input_options()
@max_faults_option
@site_options
def inject(model, output, ber, seed, batch, faults_out, logging, data, shapes, batch_axes, max_faults, names, op_types,
           formats, scales, int_widths, fault_constants):
    """Write the injection graph of MODEL to OUTPUT (runs on stock onnxruntime).

    The graph computes the fault-free model unless fault tables are fed; with --ber, one fault set
    for a batch of --batch items is sampled and saved as an .npz of those inputs.
    """
    b = None if ber is None else _one_ber(ber)
    sel = _selection(names, op_types, formats, scales, fault_constants=fault_constants)
    layout = input_layout(shapes, batch_axes)
    if b is None and (data is not None or layout.shapes):
        raise UserError("--data and --shape set the inputs of the fault set: they need --ber")
    _run(_check_inputs, [model], data, layout)
    info = _run(api.inject, model, output, selection=sel, int_widths=_widths(int_widths), logging=logging, ber=b,
                seed=seed, batch=batch, faults_output=faults_out, data=data, inputs=layout,
                max_faults=parse_max_faults(max_faults))
    click.echo(f"wrote {info['output']}: {info['sites']} fault sites")
    if b is not None:
        click.echo(f"wrote {info['faults_output']}: {info['flips']} flips for a batch of {info['batch']} at BER {b:g}")
    for node, reason in info["skipped"]:
        click.echo(f"  skipped {node}: {reason}")


@cli.command(name="eval")
@click.argument("models", nargs=-1)
@click.option("--data", default=None, help=".npz with arrays named after the model inputs (or x) and labels y.")
@click.option("--ber", "ber_text", default="0,1e-10,1e-9,1e-8,1e-7", show_default=True, help="Comma-separated BERs.")
@click.option("--trials", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--metric", type=click.Choice(["top1", "sdc"]), default="top1", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N items.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for results.json, results.csv, the plots (accuracy/metric and SDC/DUE rates) and "
                   "the campaign store (campaign.sqlite: every unit committed as it finishes).")
@campaign_run_options
@click.option("--title", default=None, help="Plot title.")
@click.option("--fault-log", default=None, type=click.Path(dir_okay=False),
              help="Write every trial's faults (JSON lines) for onnxft replay (one model only).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ORT intra-op threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--inject-protection", is_flag=True,
              help="Hardened models: also fault what harden inserted (checksums, range restriction, ABFT recovery).")
@outcome_cli_options
@fault_model_options
@input_options(shapes=False)
@max_faults_option
@site_options
def eval_(models, data, ber_text, trials, seed, metric, provider, batch, limit, out_dir, resume, workers, ray_address,
          title, fault_log, threads, quiet, inject_protection, outputs, sdc, tol, fault_model, hw, variables,
          batch_axes, max_faults, names, op_types, formats, scales, int_widths, fault_constants):
    """Accuracy (or SDC rate) of MODELS against BER, and the masked / SDC / DUE rates, with 95%
    confidence intervals.

    MODELS are paths or bundled sample names; with none, the bundled sample ViT and its
    Fashion-MNIST test data. Several models share one table, JSON, CSV and plot.
    """
    bers = _bers(ber_text)
    sel = _selection(names, op_types, formats, scales, inject_protection, fault_constants)
    if fault_log is not None and len(models) > 1:
        raise UserError("--fault-log takes one model at a time")
    layout = input_layout((), batch_axes)
    budget = parse_max_faults(max_faults)
    _run(_check_inputs, list(models) or [None], data, layout, needs_data=True)
    out_dir = _run(campaign_out_dir, out_dir, resume, workers, ray_address)
    from ..report.outputs import eval_table, write_eval_outputs

    results = []
    store = _run(api.open_store, out_dir, bool(resume)) if out_dir is not None else None
    try:
        if store is not None:  # every model's part up front: a campaign killed before its last model resumes
            _run(store.expect_parts, [api.display_name(m, str(m)) for m in models or (None,)])
        for model in models or (None,):
            bars = []
            try:
                result = _run(api.evaluate, model, data, bers=bers, trials=trials, seed=seed, metric=metric,
                              provider=provider, batch=batch, selection=sel, int_widths=_widths(int_widths),
                              limit=limit, progress=None if quiet else _progress(bars, model or "vit"),
                              fault_log=fault_log, threads=threads, outputs=outputs, sdc=sdc, tol=tol, inputs=layout,
                              max_faults=budget, store=store, workers=workers, ray_address=ray_address,
                              fault_model=fault_model, hw=hw, variables=variables)
            finally:
                for bar in bars:
                    bar.close()
            results.append(result.to_dict())
            click.echo(eval_table(results[-1:]))
    finally:
        if store is not None:
            store.close()
    if out_dir is not None:
        for p in _run(write_eval_outputs, results, out_dir, title):
            click.echo(f"wrote {p}")


class _Progress:
    """A campaign's progress callback on one tqdm bar (stderr, cleared when closed): the steps before
    the first run (``phase``: injection graph, clean pass) in its description, then the runs.
    ``bars`` collects the bar for closing."""

    def __init__(self, bars: list, label: str):
        self.bars, self.label = bars, label

    def _bar(self, total=None, desc=None):
        from tqdm import tqdm

        if not self.bars:
            self.bars.append(tqdm(total=total, unit="run", leave=False, file=sys.stderr, desc=desc or self.label))
        return self.bars[0]

    def phase(self, text: str):
        self._bar(desc=f"{self.label}: {text}").set_description(f"{self.label}: {text}")

    def __call__(self, done, total):
        bar = self._bar(total)
        if bar.total != total:  # the runs start: the bar counts them from here
            bar.reset(total=total)
            bar.set_description(self.label)
        bar.update(done - bar.n)


def _progress(bars: list, label: str):
    return _Progress(bars, label)


def _check_inputs(models, data, layout, needs_data: bool = False):
    """Argument mistakes caught before any work: a model that does not exist, ``--shape`` with
    ``--data``, and (``needs_data``) a model without bundled data while no ``--data`` is given
    (``eval vit model.onnx``: the sample has its data, the file has none)."""
    from .. import samples

    if data is not None and layout.shapes:
        raise ValueError("--shape is for running without --data: the data's arrays give the shapes")
    if data is not None and not Path(data).is_file():
        raise ValueError(f"data file not found: {data}")
    for model in models:
        path, default = samples.resolve_model(model)
        if not Path(path).is_file():
            raise ValueError(f"model not found: {model} (a path, or a sample: "
                             f"{', '.join(m['name'] for m in samples.manifest()['models'])})")
        if needs_data and data is None and default is None:
            raise ValueError(f"{model} has no bundled data: give --data D.npz"
                             + (" (bundled samples and files mixed: give the file's data, or evaluate them apart)"
                                if len(models) > 1 else ""))


def _check_out_dir(out_dir, flag: str = "--out"):
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {out_dir} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {out_dir}: cannot create the folder ({exc.strerror})") from None
    import os

    if not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {out_dir} is not writable")


@cli.command()
@click.argument("model", required=False)
@click.option("--ber", default="1e-8", show_default=True)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data", default=None, help="Use the first batch of this .npz instead of random inputs.")
@click.option("--threads", default=None, type=click.IntRange(min=1))
@click.option("--baseline", default=None,
              help="Compare MODEL's fault-free latency with this model's instead (e.g. hardened vs original).")
@input_options()
@max_faults_option
@click.option("--per-layer", is_flag=True,
              help="With --baseline: the protection's cost per GEMM/Conv, from onnxruntime's profile.")
@click.option("--json", "as_json", is_flag=True)
def bench(model, ber, batch, repeats, provider, data, threads, baseline, shapes, batch_axes, max_faults, per_layer,
          as_json):
    """Clean and injected per-inference times (interleaved runs, medians) and their ratio.

    With --baseline, the fault-free latency of MODEL against BASELINE (hardening overhead)."""
    if baseline is not None:
        if model is None:
            raise UserError("--baseline needs MODEL (the hardened graph) too")
        layout = input_layout(shapes, batch_axes)
        _run(_check_inputs, [model, baseline], data, layout)
        info = _run(api.overhead, model, baseline, batch=batch, provider=provider, repeats=repeats, data=data,
                    threads=threads, inputs=layout, per_layer=per_layer)
        if as_json:
            click.echo(json.dumps(info))
        else:
            click.echo(f"{info['model']} vs {info['baseline']}: batch {info['batch']}, provider {info['provider']}")
            click.echo(f"  baseline {info['baseline_ms']:.2f} ms   model {info['model_ms']:.2f} ms   "
                       f"ratio {info['ratio']:.3f}   (overhead {100 * info['overhead']:+.1f}%, median of {repeats})")
            if per_layer:
                from ..report.outputs import per_layer_table

                click.echo(per_layer_table(info["per_layer"]))
        return
    if per_layer:
        raise UserError("--per-layer needs --baseline MODEL (it splits a hardened graph's overhead)")
    b = _one_ber(ber)
    layout = input_layout(shapes, batch_axes)
    _run(_check_inputs, [model], data, layout)
    info = _run(api.bench, model, ber=b, batch=batch, provider=provider, repeats=repeats, data=data, threads=threads,
                inputs=layout, max_faults=parse_max_faults(max_faults))
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"{info['model']}: batch {info['batch']}, BER {b:g}, {info['sites']} sites, "
                   f"provider {info['provider']}")
        click.echo(f"  clean {info['clean_ms']:.2f} ms   injected {info['injected_ms']:.2f} ms   "
                   f"ratio {info['ratio']:.3f}   ({info['faults_per_run']:.1f} flips per run, median of {repeats})")


@cli.command()
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--record", default=0, show_default=True, type=click.IntRange(min=0), help="Line of the log.")
@click.option("--model", default=None, help="Model path (default: the one named in the log).")
@click.option("--data", default=None, help="Data path (default: the one named in the log).")
@click.option("--json", "as_json", is_flag=True)
def replay(log, record, model, data, as_json):
    """Re-run one logged trial and check that its output is reproduced exactly."""
    info = _run(api.replay, log, record, model, data)
    if as_json:
        click.echo(json.dumps(info))
    else:
        verdict = "reproduced exactly" if info["identical"] else "DIFFERENT output"
        click.echo(f"record {record}: {info['faults']} flips, BER {info['ber']:g}, trial {info['trial']}: {verdict}")
    if not info["identical"]:
        sys.exit(1)


from . import compare as _compare_verb  # noqa: E402,F401  (registers the verb)
from . import harden as _harden_verb  # noqa: E402,F401  (registers the verb)
cli.add_command(__import__("onnxft.cli.vuln", fromlist=["vuln"]).vuln)  # verb in its own module
cli.add_command(__import__("onnxft.cli.intensity", fromlist=["intensity"]).intensity)
cli.add_command(__import__("onnxft.cli.ra", fromlist=["ra"]).ra)  # verb in its own module


def main(argv=None):
    try:
        rv = cli.main(args=argv, prog_name="onnxft", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("onnxft: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"onnxft: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
