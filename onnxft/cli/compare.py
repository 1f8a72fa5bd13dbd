"""``onnxft compare``: protection schemes side by side (accuracy under injection, overhead)."""
from __future__ import annotations

import json

import click

from .. import api
from ..campaigns.abft_impl import POLICIES
from ..passes.thresholds import PRECISIONS
from .clip_options import clip_options, clip_train_options
from .main import (_bers, _one_ber, _run, campaign_out_dir, campaign_run_options, cli, fault_constants_option,
                   fault_model_options, outcome_cli_options)

SCHEMES = ("none", "range", "standard", "sec", "lb", "lb+range", "lb+range+dmr", "tmr", "auto",
           "clip-ranger", "clip-layer", "clip-neuron", "proact")


@cli.command()
@click.argument("model", required=False)
@click.option("--schemes", default="none,range,standard,lb,lb+range", show_default=True,
              help=f"Comma-separated: {', '.join(SCHEMES)}.")
@click.option("--ber", "ber_text", default="1e-8,1e-7", show_default=True, help="Comma-separated BERs.")
@click.option("--design-ber", default=None, help="BER the block sizes (and auto) are chosen for (default: the largest).")
@click.option("--data", default=None, help="Labelled .npz (default: the sample's).")
@click.option("--calib", default=None, help="Calibration .npz (default: the sample's last 512 items, or the data).")
@click.option("--trials", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N items.")
@click.option("--batch", default=250, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--target-drop", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="auto: accuracy target below clean.")
@click.option("--max-overhead", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="auto: overhead cap (fraction of the model's operations).")
@click.option("--range", "range_mode", type=click.Choice(["clamp", "zero"]), default="clamp", show_default=True,
              help="Range restriction mode of the range and lb+range schemes.")
@click.option("--range-ops", default="softmax,gelu", show_default=True,
              help="What range and lb+range restrict (as harden --range-ops).")
@click.option("--alpha", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Margin of calibrated range bounds (as harden --alpha; 0.25 suits --range zero).")
@click.option("--dmr", default="layernorm", show_default=True,
              help="What lb+range+dmr duplicates and compares (as harden --dmr).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="tf32", show_default=True,
              help="Serving precision of the ABFT thresholds (as harden --precision; fp32 for CPU serving).")
@click.option("--abft-impl", "abft_impl", type=click.Choice(list(POLICIES)), default="global",
              show_default=True, help="How the LB schemes build each GEMM's check (as harden --abft-impl).")
@click.option("--latency", is_flag=True, help="Also measure each scheme's fault-free latency ratio (CPU, batch 8).")
@click.option("--inject-protection", is_flag=True,
              help="Also fault each scheme's protection: checks, range restriction, voters and ABFT recovery.")
@fault_constants_option
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@clip_options(method=False)
@click.option("--threads", default=None, type=click.IntRange(min=1))
@outcome_cli_options
@fault_model_options
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write compare.json, compare.csv, accuracy_vs_ber.png, outcomes_vs_ber.png, overhead.png and "
                   "the campaign store (campaign.sqlite: one part per scheme, and auto's Algorithm 1) here.")
@campaign_run_options
@click.option("--json", "as_json", is_flag=True)
def compare(model, schemes, ber_text, design_ber, data, calib, trials, limit, batch, seed, target_drop, max_overhead,
            range_mode, range_ops, alpha, dmr, precision, abft_impl, latency, inject_protection, fault_constants,
            provider, clip_mode,
            train, train_limit, epochs, penalty, threads, outputs, sdc, tol, fault_model, hw, variables, out_dir, resume,
            workers, ray_address, as_json):
    """Accuracy and masked / SDC / DUE rates under injection, and operation overhead, of protection
    schemes for MODEL."""
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEMES]
    if bad or not names:
        raise click.BadParameter(f"choose from {', '.join(SCHEMES)}", param_hint="--schemes")
    bers = _bers(ber_text)
    dber = None if design_ber is None else _one_ber(design_ber, "--design-ber")
    out_dir = _run(campaign_out_dir, out_dir, resume, workers, ray_address)

    def progress(msg):
        if not as_json:
            click.echo(msg, err=True)

    store = _run(api.open_store, out_dir, bool(resume)) if out_dir is not None else None
    try:
        out = _run(api.compare, model, names, bers, data=data, calib=calib, trials=trials, seed=seed, batch=batch,
                   provider=provider, limit=limit, design_ber=dber, latency=latency, progress=progress,
                   threads=threads, range_mode=range_mode,
                   range_kinds=[k.strip() for k in range_ops.split(",") if k.strip()], alpha=alpha,
                   inject_protection=inject_protection, fault_constants=fault_constants, dmr=dmr.split(","), target_drop=target_drop,
                   max_overhead=max_overhead, outputs=outputs, sdc=sdc, tol=tol, precision=precision, abft_impl=abft_impl, store=store,
                   workers=workers, ray_address=ray_address, train=train,
                   clip_options=clip_train_options("proact", clip_mode, train_limit, epochs, penalty),
                   fault_model=fault_model, hw=hw, variables=variables)
    finally:
        if store is not None:
            store.close()
    from ..report.compare import compare_table, write_compare_outputs

    if as_json:
        click.echo(json.dumps({k: v for k, v in out.items() if k != "eval_results"}, indent=2))
    else:
        click.echo(compare_table(out))
    if out_dir is not None:
        for p in _run(write_compare_outputs, out, out_dir):
            click.echo(f"wrote {p}", err=as_json)
