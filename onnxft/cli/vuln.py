"""``onnxft vuln``: vulnerability factors per layer, module, op type, input patch or bit."""
from __future__ import annotations

import json

import click

from .. import api
from .main import UserError, _one_ber, _progress, _run, campaign_out_dir, campaign_run_options, fault_constants_option

GRANULARITIES = ("model", "layer", "module", "optype", "patch", "bit")


def _list(text: str, param: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=param) from None


@click.command(name="vuln")
@click.argument("model", required=False)
@click.option("--data", default=None, help=".npz with the model's inputs and labels y (default: the sample's).")
@click.option("--granularity", "-g", default="layer", show_default=True,
              help=f"Comma-separated: {', '.join(GRANULARITIES)} (network ones share their fault samples).")
@click.option("--ber", default=None, help="Measure at this BER.")
@click.option("--target-loss", default=None,
              help="Comma-separated accuracy losses (e.g. 0.1,0.2,0.3): measure at the BERs that cost them.")
@click.option("--loss-mode", type=click.Choice(["relative", "absolute"]), default="relative", show_default=True,
              help="relative: accuracy = clean x (1 - loss); absolute: clean - loss.")
@click.option("--trials", default=2, show_default=True, type=click.IntRange(min=1), help="Trials at least.")
@click.option("--ci-width", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="Add trials until every factor's 95% half-width is at most this...")
@click.option("--max-trials", default=10, show_default=True, type=click.IntRange(min=1), help="...or this many.")
@click.option("--search-trials", default=1, show_default=True, type=click.IntRange(min=1),
              help="Trials per point of the BER search.")
@click.option("--patch", default=None, type=click.IntRange(min=1),
              help="Patch side in pixels (default: the ViT's patch-embedding stride, or a 7x7-like grid).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N items.")
@click.option("--batch", default=250, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ORT intra-op threads.")
@click.option("--output", "outputs", default=None,
              help="The output whose arg-max is scored against the labels (default: the first float output).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write results.json, results.csv, plots and the campaign store (campaign.sqlite) here.")
@fault_constants_option
@campaign_run_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def vuln(model, data, granularity, ber, target_loss, loss_mode, trials, ci_width, max_trials, search_trials, patch,
         limit, batch, seed, provider, threads, outputs, fault_constants, out_dir, resume, workers, ray_address, as_json,
         quiet):
    """Vulnerability factor of each component of MODEL: accuracy with the component fault-free
    minus accuracy unprotected, with paired 95% intervals (common random numbers)."""
    grans = [g.strip() for g in granularity.split(",") if g.strip()]
    bad = [g for g in grans if g not in GRANULARITIES]
    if bad or not grans:
        raise click.BadParameter(f"choose from {', '.join(GRANULARITIES)}", param_hint="--granularity")
    if (ber is None) == (target_loss is None):
        raise UserError("give either --ber or --target-loss")
    one_ber = None if ber is None else _one_ber(ber)
    losses = _list(target_loss, "--target-loss") if target_loss is not None else []
    if max_trials < trials:
        raise click.BadParameter("must be at least --trials", param_hint="--max-trials")
    out_dir = _run(campaign_out_dir, out_dir, resume, workers, ray_address)
    bars = []
    store = _run(api.open_store, out_dir, bool(resume)) if out_dir is not None else None
    try:
        result = _run(api.vuln, model, data, granularity=grans, ber=one_ber, target_losses=losses,
                      loss_mode=loss_mode, trials=trials, max_trials=max_trials, ci_width=ci_width, seed=seed,
                      batch=batch, limit=limit, provider=provider, threads=threads,
                      patch=(patch, patch) if patch else None,
                      progress=None if quiet or as_json else _progress(bars, model or "vit"),
                      search_trials=search_trials, outputs=outputs, fault_constants=fault_constants, store=store,
                      workers=workers,
                      ray_address=ray_address)
    finally:
        for b in bars:
            b.close()
        if store is not None:
            store.close()
    from ..report.vuln_plots import vuln_table, write_vuln_outputs

    click.echo(json.dumps(result, indent=2) if as_json else vuln_table(result))
    if out_dir is not None:
        for p in _run(write_vuln_outputs, result, out_dir):
            if not as_json:
                click.echo(f"wrote {p}")
