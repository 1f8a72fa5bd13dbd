"""``onnxft ra``: Resiliency Accuracy, accuracy given k faults in one inference (or, with
``--curve``, accuracy against BER from conditional campaigns)."""
from __future__ import annotations

import json
import sys

import click

from .. import api
from .main import UserError, _bers, _check_out_dir, _run, _selection, _widths, outcome_cli_options, site_options


@click.command(name="ra")
@click.argument("model", required=False)
@click.option("--data", default=None, help=".npz with the model's inputs and labels y (default: the sample's).")
@click.option("--hw", default=None,
              help="Variable-level model: ws:RxC, os:RxC, is:RxC, gpu:TMxTNxTK or equal (default: operation-wise).")
@click.option("--faults", default=1, show_default=True, type=click.IntRange(min=0), help="k: faults per inference.")
@click.option("--method", type=click.Choice(["mc", "is"]), default="mc", show_default=True,
              help="Plain Monte Carlo, or importance sampling (any --faults; product proposal for k > 1).")
@click.option("--budget", default=None, type=click.IntRange(min=1),
              help="Inferences at most (default 2000 without --ci-width).")
@click.option("--ci-width", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Stop once the 95% half-width is at most this.")
@click.option("--curve", is_flag=True, help="Accuracy at --ber from conditional campaigns (operation-wise model).")
@click.option("--ber", "ber_text", default=None, help="Comma-separated BERs for --curve.")
@click.option("--k-max", default=None, type=click.IntRange(min=1), help="--curve: largest k (default: tail < 1e-3).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N items.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ORT intra-op threads.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write results.json, results.csv and a plot here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--metric", type=click.Choice(["top1", "sdc"]), default="top1", show_default=True,
              help="RA as top-1 accuracy given the faults, or as 1 - SDC - DUE (no labels needed).")
@outcome_cli_options
@site_options
def ra(model, data, hw, faults, method, budget, ci_width, curve, ber_text, k_max, seed, batch, limit, provider, threads,
       out_dir, as_json, quiet, metric, outputs, sdc, tol, names, op_types, formats, scales, int_widths,
       fault_constants):
    """Resiliency Accuracy of MODEL: top-1 accuracy (or 1 - SDC - DUE, --metric sdc) given exactly
    --faults faults in one inference, with a 95% interval (RA = RA_1), and the SDC and DUE rates."""
    if curve != (ber_text is not None):
        raise UserError("--curve and --ber go together")
    bers = _bers(ber_text) if curve else None
    if budget is None and (ci_width is None or curve):
        budget = 2000
    if out_dir is not None:
        _run(_check_out_dir, out_dir)
    sel = _selection(names, op_types, formats, scales, fault_constants=fault_constants)
    bar = []

    def progress(runs):
        if quiet or as_json:
            return
        if not bar:
            from tqdm import tqdm

            bar.append(tqdm(unit="inference", leave=False, file=sys.stderr, desc=model or "vit"))
        bar[0].update(runs - bar[0].n)

    try:
        result = _run(api.ra, model, data, hw, faults, method, budget, ci_width, seed, batch, limit, provider,
                      threads, sel, _widths(int_widths), bers, k_max, None, progress, metric, outputs, sdc, tol)
    finally:
        for b in bar:
            b.close()
    from ..report.ra_outputs import ra_table, write_ra_outputs

    click.echo(json.dumps(result, indent=2) if as_json else ra_table(result))
    if out_dir is not None:
        for p in _run(write_ra_outputs, result, out_dir):
            if not as_json:
                click.echo(f"wrote {p}")
