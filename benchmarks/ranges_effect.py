"""Accuracy under injection of the sample ViT with and without range restriction (Softmax + GELU).

    python benchmarks/ranges_effect.py --ber 1e-8,1e-7 --limit 500 --trials 2

Faults go into the model's own computation only (the range nodes are protection, not sites), with
the same seeds for every model, so the rows differ only by the protection.
"""
from __future__ import annotations

import argparse
import sys

import onnx

import onnxft.api as ft
from onnxft import samples
from onnxft.campaigns.calibrate_ranges import calibrate_ranges, dataset_batches
from onnxft.passes.ranges import find_range_sites, restrict_ranges, site_bounds
from onnxft.runtime.data import input_specs, load_npz


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--ber", default="1e-8,1e-7")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--kinds", default="softmax,gelu")
    args = ap.parse_args(argv)
    path, data = samples.resolve_model(args.model)
    model = onnx.load(path)
    sites = find_range_sites(model, kinds=args.kinds.split(","))
    calib = load_npz(data, input_specs(model))  # bounds from the bundled data (as harden --calib would)
    bounds = site_bounds(sites, calibrate_ranges(model, dataset_batches(calib, 250), sites.needing_calibration()))
    variants = {"none": model}
    for mode in ("clamp", "zero"):
        variants[f"range {mode}"] = restrict_ranges(model, bounds, mode, sites).model
    bers = [0.0] + [float(b) for b in args.ber.split(",")]
    print(f"{'model':<12} " + " ".join(f"{b:>8g}" for b in bers))
    for name, m in variants.items():
        r = ft.evaluate(m, data, bers=bers, trials=args.trials, limit=args.limit, batch=250, provider="cpu")
        print(f"{name:<12} " + " ".join(f"{p.value:>8.3f}" for p in r.points), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
