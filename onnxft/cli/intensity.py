"""``onnxft intensity``: arithmetic intensity per GEMM/Conv against the device's ridge point (seed 004)."""
from __future__ import annotations

import json

import click

from .. import api
from .main import _run


@click.command(name="intensity")
@click.argument("model")
@click.option("--data", default=None, help="Take shapes from the first --batch items of this .npz.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Deployment batch.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ORT intra-op threads.")
@click.option("--ridge", default=None, type=float, help="Ridge point in FLOP/byte (skips the micro-benchmark).")
@click.option("--refresh-ridge", is_flag=True, help="Measure the ridge point again instead of the cached one.")
@click.option("--json", "as_json", is_flag=True)
def intensity(model, data, batch, provider, threads, ridge, refresh_ridge, as_json):
    """Arithmetic intensity (2MNK / bytes) of every GEMM and Conv at its run-time shapes, the device's
    ridge point, and each one's regime (compute- or memory-bound) and ABFT implementation by the
    seed's rule (global when compute-bound, dup when memory-bound; harden --abft-impl ig applies it)."""
    info = _run(api.intensity, model, data, batch, provider, threads, ridge, refresh_ridge)
    if as_json:
        click.echo(json.dumps(info))
        return
    r = info["ridge"]
    how = {"override": "given", "cache": "cached measurement", "measured": "measured now"}[r["source"]]
    figures = f" ({r['gemm_flops'] / 1e9:.1f} GFLOP/s, {r['bandwidth'] / 1e9:.1f} GB/s)" if "gemm_flops" in r else ""
    click.echo(f"{info['model']}: batch {info['batch']}; ridge point {r['ridge']:.2f} FLOP/byte, {how}{figures}")
    click.echo(f"  {'GEMM / Conv':<44} {'M':>6} {'N':>6} {'K':>6} {'x':>4} {'AI':>8}  regime   impl")
    for c in info["calls"]:
        click.echo(f"  {c['name'][-44:]:<44} {c['M']:6d} {c['N']:6d} {c['K']:6d} {c['gemms']:4d} {c['ai']:8.2f}  "
                   f"{c['regime']:<8} {c['impl']}")
    n_mem = sum(c["regime"] == "memory" for c in info["calls"])
    click.echo(f"  {len(info['calls'])} calls: {n_mem} memory-bound, {len(info['calls']) - n_mem} compute-bound")
