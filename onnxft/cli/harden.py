"""``onnxft harden``: write a hardened model (ABFT + range restriction) and its plan."""
from __future__ import annotations

import json

import click

from .. import api
from ..campaigns.abft_impl import POLICIES
from ..campaigns.coverage import coverage_line
from ..passes.abft import IMPLS
from ..passes.dmr import op_types_from
from ..passes.thresholds import DEFAULT_PRECISION, PRECISIONS
from .clip_options import clip_options, clip_train_options
from .main import UserError, _one_ber, _run, campaign_out_dir, campaign_run_options, cli


def _block_size(text: str):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected auto or a positive integer", param_hint="--block-size") from None
    if value < 1:
        raise click.BadParameter(f"{text!r}: expected auto or a positive integer", param_hint="--block-size")
    return value


@cli.command()
@click.argument("model")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where to write the hardened model (default: MODEL.hardened.onnx); the plan goes beside it.")
@click.option("--abft", type=click.Choice(["lb", "standard", "sec", "none"]), default="lb", show_default=True,
              help="Checksum protection of MatMul/Gemm: LB-ABFT (block-wise recovery), standard (single-error correction, else recompute), sec (single-error correction only: the paper's baseline), or none.")
@click.option("--range", "range_mode", type=click.Choice(["clamp", "zero", "none"]), default="clamp",
              show_default=True, help="Range restriction after Softmax/GELU: clamp to bounds, zero outside, or none.")
@click.option("--range-ops", default="softmax,gelu", show_default=True,
              help="Activations to range-restrict: softmax,gelu and optionally relu,layernorm,sigmoid,tanh, and "
                   "quantized (QDQ models: every arithmetic op's output, to its QuantizeLinear's range; use with "
                   "--range zero).")
@click.option("--calib", default=None, help=".npz of calibration inputs (bounds of GELU & co., ABFT thresholds).")
@click.option("--calib-limit", default=512, show_default=True, type=click.IntRange(min=1),
              help="Use at most this many calibration items.")
@click.option("--ber", "ber_text", default="1e-8", show_default=True, help="BER the block sizes are chosen for.")
@click.option("--block-size", default="auto", show_default=True, help="auto (OptBlockSizeSelection) or N.")
@click.option("--gemms", default=None, help="Regex: protect only MatMul/Gemm whose names match.")
@click.option("--batch", "fixed_batch", default=None, type=click.IntRange(min=1),
              help="Fix the inputs' batch axis to N: static shapes let onnxruntime update GEMM outputs in place.")
@click.option("--alpha", default=0.02, show_default=True, type=float, help="Margin of calibrated range bounds.")
@click.option("--dmr", default="", help="Duplicate and compare these ops (layernorm, softmax, gelu or ONNX op "
                                        "types, comma-separated); recompute on a mismatch.")
@click.option("--select", type=click.Choice(["all", "auto"]), default="all", show_default=True,
              help="all: every protectable GEMM; auto: Algorithm 1 picks GEMMs by vulnerability under "
                   "--target-drop and --max-overhead at --ber.")
@click.option("--target-drop", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="--select auto: accuracy may be at most this far below clean.")
@click.option("--max-overhead", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="--select auto: expected extra operations / the model's operations.")
@click.option("--data", default=None, help="--select auto: labelled .npz to measure accuracy on.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="--select auto: first N items only.")
@click.option("--trials", default=2, show_default=True, type=click.IntRange(min=1),
              help="--select auto: trials per measurement.")
@click.option("--select-out", default=None, type=click.Path(file_okay=False),
              help="--select auto: commit Algorithm 1's measurements to DIR/campaign.sqlite (continue a killed "
                   "selection with --resume DIR).")
@campaign_run_options
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULT_PRECISION, show_default=True,
              help="Arithmetic of the runtime that will serve the model; ABFT thresholds are rounding bounds for it "
                   "(tf32: safe on CPU and on onnxruntime CUDA's defaults; fp32: 30x tighter, for CPU or CUDA with "
                   "use_tf32=0). float16 GEMMs/Convs are bounded for float16 accumulation (ARM64, CUDA split-K) "
                   "unless fp16acc32: float32 accumulation, as onnxruntime CPU on x86-64 runs them (150x tighter at K = 384).")
@click.option("--tolerance", default=None, type=click.FloatRange(min=0),
              help="Largest fault-free difference (relative to each output's largest magnitude) on held-out "
                   "items at onnxruntime's default level; harden refuses a model beyond it. Default: 1e-5 for a "
                   "float32 model, 4 ulps (4 x 2^-10) for one that computes in float16 (2^-7: bfloat16).")
@click.option("--force", is_flag=True, help="Write the model even when it is outside --tolerance.")
@click.option("--keep-opset", is_flag=True, help="Refuse, rather than raise the opset, when the protection "
                                                  "needs a newer one (ABFT: 13).")
@click.option("--recurrent", is_flag=True,
              help="Also protect LSTM/GRU/RNN: decompose them into MatMuls and a Loop whose products ABFT checks "
                   "(raises the opset to 18; fault-free outputs then differ by float32 rounding).")
@click.option("--abft-impl", "abft_impl", type=click.Choice(list(POLICIES)), default="global",
              show_default=True,
              help="How each GEMM's check is built (docs/abft.md): global (row sums of Y against A(Be), a separate "
                   "pass), fused (checksum columns appended to the constant weight, one GEMM), dup (the product again "
                   "with the weight negated, compared), ig (per GEMM by arithmetic intensity against the ridge point).")
@click.option("--autotune", is_flag=True, help="With --abft-impl ig: time every implementation per GEMM on "
                                               "--provider and keep the fastest.")
@click.option("--ridge", default=None, type=float,
              help="--abft-impl ig: the device's ridge point in FLOP/byte (default: measured once and cached).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="--abft-impl ig: onnxruntime threads of the ridge measurement and --autotune timings.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@clip_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def harden(model, output, abft, range_mode, range_ops, calib, calib_limit, ber_text, block_size, gemms, fixed_batch,
           alpha, dmr, select, target_drop, max_overhead, data, limit, trials, select_out, resume, workers,
           ray_address, precision, tolerance, force, keep_opset, recurrent, abft_impl, autotune, ridge, threads,
           provider, clip, clip_mode, train, train_limit, epochs, penalty, as_json):
    """Write a hardened MODEL: standard ONNX (opset raised to 13 only where ABFT needs it), runs on stock onnxruntime.

    The plan (GEMMs, block sizes, thresholds, expected operation counts, calibrated bounds,
    what was skipped and why) is written beside it as OUTPUT-stem.plan.json.
    """
    ber = _one_ber(ber_text)
    kinds = tuple(k.strip() for k in range_ops.split(",") if k.strip())
    opts = api.HardenOptions(abft=abft, range_mode=range_mode, ber=ber, block_size=_block_size(block_size),
                             range_kinds=kinds, alpha=alpha, gemms=gemms, batch=fixed_batch,
                             dmr=op_types_from(dmr.split(",")), precision=precision, tolerance=tolerance,
                             force=force, keep_opset=keep_opset, recurrent=recurrent, abft_impl=abft_impl,
                             autotune=autotune, ridge=ridge, provider=provider, threads=threads,
                             clip=clip_train_options(clip, clip_mode, train_limit, epochs, penalty))
    sel = None
    if select == "auto":
        if gemms is not None:
            raise UserError("--gemms and --select auto both choose GEMMs: give one")
        sel = api.CampaignSpec(target_drop=target_drop, max_overhead=max_overhead, trials=trials,
                               max_trials=max(trials, 4), ci_width=0.03, batch=250, provider=provider)

    def progress(msg):
        if not as_json:
            click.echo(msg, err=True)

    if sel is None and (select_out or resume or workers > 1 or ray_address):
        raise UserError("--select-out, --resume, --workers and --ray-address are for --select auto")
    store_dir = _run(campaign_out_dir, select_out, resume, workers, ray_address, "--select-out")
    store = _run(api.open_store, store_dir, bool(resume)) if store_dir is not None else None
    try:
        plan = _run(api.harden, model, output, opts, calib=calib, calib_limit=calib_limit, select=sel, data=data,
                    limit=limit, progress=progress, train=train, store=store, workers=workers,
                    ray_address=ray_address)
    finally:
        if store is not None:
            store.close()
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo(plan_summary(plan))


def plan_summary(plan: dict) -> str:
    lines = [f"wrote {plan['output']} and {plan['plan_path']}"]
    op = plan.get("opset") or {}
    if op.get("raised"):
        v = op["verification"]
        lines.append(f"opset raised from {op['original']} to {op['hardened']} ({op['reason']}); fault-free outputs "
                     f"on {v['items']} {v['data']}: max abs difference {v['max_abs_diff']:.3g}"
                     + (" (bit-identical)" if v["bit_identical"] else ""))
    if "coverage" in plan:
        lines.append(coverage_line(plan["coverage"]))
    gemms = plan.get("gemms", [])
    if plan["abft"] != "none":
        t = plan.get("abft_totals", {})
        convs = plan.get("convs", [])
        impl = plan.get("abft_impl") or {}
        if impl.get("policy") == "ig":
            chosen = [g.get("impl") for g in gemms]
            lines.append(f"ABFT implementation ig{' (autotuned)' if impl.get('autotune') else ''}: ridge point "
                         f"{impl['ridge']['ridge']:.3g} FLOP/byte ({impl['ridge'].get('source')}), batch {impl['batch']}; "
                         + ", ".join(f"{chosen.count(k)} {k}" for k in IMPLS if chosen.count(k)))
        elif impl.get("policy", "global") != "global":
            lines.append(f"ABFT implementation {impl['policy']}: {sum(g.get('impl') == impl['policy'] for g in gemms)} "
                         f"of {len(gemms)} GEMMs (the others global: see impl_fallback in the plan)")
        lines.append(f"ABFT {plan['abft']}: {len(gemms)} GEMMs" + (f" and {len(convs)} Conv" if convs else "") + " protected"
                     + (f"; expected extra operations at BER {plan['ber']:g}: {100 * t['overhead']:.2f}% "
                        f"of the protected GEMMs' operations" if "overhead" in t else ""))
        for g in gemms[:12]:
            shape = f"M={g.get('M')} N={g.get('N')} K={g.get('K')}"
            lines.append(f"  {g.get('name', '?'):<40} {shape:<20} {g.get('scheme')} block {g.get('block_size') or '-'}"
                         f" {g.get('impl', 'global')}" + (f" (AI {g['ai']:.3g}, {g['regime']}-bound)" if "ai" in g else ""))
        if len(gemms) > 12:
            lines.append(f"  … {len(gemms) - 12} more in the plan")
    if plan.get("clip"):
        c = plan["clip"]
        lines.append(f"clip {c['method']} ({c['mode']}): {c['thresholds']} thresholds ({c['bytes']} bytes) over "
                     f"{len(c['layers'])} activations, trained in {c['train_seconds']:.1f} s on {c['train_items']} items")
    if plan["range"] != "none":
        lines.append(f"range {plan['range']}: {len(plan.get('ranges', []))} activations")
    if plan.get("dmr"):
        lines.append(f"duplicated and compared: {len(plan['dmr']['nodes'])} nodes ({', '.join(plan['dmr']['op_types'])})")
        for r in plan.get("ranges", [])[:8]:
            lo, hi = r["bounds"]
            lines.append(f"  {r['kind']:<9} {r['tensor']:<48} [{lo:.4g}, {hi:.4g}]")
    sel = plan.get("selection")
    if sel:
        lines.append(f"Algorithm 1 at BER {sel['ber']:g}: clean {sel['clean']:.4f}, unprotected {sel['unprotected']:.4f}, "
                     f"target {sel['target']:.4f}; chose {len(sel['chosen'])} GEMMs, overhead "
                     f"{100 * sel['overhead']:.3f}% of the model's operations")
        lines.append(f"  accuracy: {sel['accuracy']:.4f} estimated, {sel['measured_accuracy']:.4f} measured on the "
                     f"hardened graph ({'target reached' if sel['reached'] else 'target NOT reached under the cap'})")
    v = plan.get("verification", {})
    if v:
        lines.append(f"fault-free check on {v['items']} {v.get('data', 'items')} (onnxruntime level {v.get('level')}): "
                     f"max abs difference {v['max_abs_diff']:.3g}, max relative {v['max_rel_diff']:.3g}"
                     + (" (bit-identical)" if v.get("bit_identical") else "")
                     + f"; {v.get('top1_changed', 0)} top-1 changes, {v.get('out_of_range', 0)} items outside the "
                       f"calibrated ranges; tolerance {v.get('tolerance', 0):.3g} ({v.get('tolerance_basis', '')})"
                     + ("; FORCED past the tolerance" if v.get("forced") else ""))
        if v.get("out_of_range"):
            lines.append(f"  inside the calibrated ranges ({v['in_range_items']} items): max relative difference "
                         f"{v['in_range_max_rel_diff']:.3g} (tolerance {v['tolerance']:.3g}: {v.get('tolerance_basis', '')})"
                         + ("; no held-out item stayed inside: calibrate on more data to check the tolerance"
                            if not v["in_range_items"] else ""))
    for node, reason in plan.get("skipped", [])[:20]:
        lines.append(f"  skipped {node}: {reason}")
    return "\n".join(lines)


__all__ = ["harden", "UserError"]
