"""Detection coverage of ABFT by bit position, under the real injection pass.

    python benchmarks/abft_coverage.py                       # sample vit, lb, 16 trials per cell
    python benchmarks/abft_coverage.py --model vit_int8 --trials 32 --scheme standard
    python benchmarks/abft_coverage.py --precision fp32,tf32,bf16 --trials 8   # one table per precision

For every bit 0..31 and every kind of operation of a protected GEMM (a product, a partial sum, the
final sum = the GEMM's output element, and the bias add of MatMul+Add units), it injects single
faults at random protected GEMMs, items and elements of a hardened model (``abft(...,
expose_flags=True)`` then ``inject``), one fault per run, batch 1, and counts how often the GEMM's
``detected`` flag fires and how often the model output still differs from the fault-free output
after recovery (max |diff| > 1e-5 max |clean output|: recomputed blocks round differently from
the original kernel by about 1e-7, which this ignores). Undetected faults are those below the rounding threshold
tau: low mantissa bits, whose effect on the output is below the model's own rounding noise. For
int8 models the GEMM's products and sums are integers (16/32-bit by default, docs/fault_model.md),
so bits beyond the width are skipped.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx

from onnxft import samples
from onnxft.faults.sampling import Faults, fault_feeds
from onnxft.passes.abft import abft
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession

KINDS = ("product", "partial sum", "final sum", "bias add")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--scheme", default="lb", choices=["lb", "standard"])
    ap.add_argument("--trials", type=int, default=16, help="faults per (bit, kind) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="thresholds calibrated on the last N test images (default: rounding bound)")
    ap.add_argument("--precision", default="fp32",
                    help="comma-separated serving precisions (fp32, tf32, fp16, fp16acc32, bf16): the thresholds are the "
                         "rounding bounds for each (faults are injected into onnxruntime's float32 arithmetic)")
    args = ap.parse_args(argv)
    summary = []
    for prec in args.precision.split(","):
        summary.append((prec, run_table(args, prec.strip())))
    print("\n# detected % / output still wrong % over all bits, per precision")
    print(f"{'precision':<10} " + " ".join(f"{k:>22}" for k in KINDS))
    for prec, totals in summary:
        print(f"{prec:<10} " + " ".join(f"{(100 * d / n if n else float('nan')):>13.1f} / {(100 * w / n if n else float('nan')):>5.1f}"
                                        for d, w, n in totals.values()))
    return 0


def run_table(args, prec: str) -> dict:
    s = samples.sample_model(args.model)
    model = onnx.load(s["path"] if s else args.model)
    x = np.load(samples.sample_data_path())["x"]
    thresholds = None
    if args.calibrate:
        from onnxft.campaigns.calibrate_abft import calibrate_abft
        thresholds = calibrate_abft(model, [{"x": x[-args.calibrate:]}], precision=prec)
    hardened = abft(model, scheme=args.scheme, expose_flags=True, thresholds=thresholds, precision=prec)
    by_output = {}
    for g in hardened.details["gemms"]:
        by_output[g["name"]] = g["name"]
        if g["bias"]:
            by_output[g["bias"]] = g["name"]
    sess = InjectionSession(inject(hardened.model).model, "cpu", threads=1)
    rng = np.random.default_rng(args.seed)
    table = sess.table.sites
    gemm_sites = [i for i, t in enumerate(table) if t.kind == "gemm" and t.node in by_output]
    bias_sites = [i for i, t in enumerate(table) if t.kind == "elementwise" and t.node in by_output]
    names = [o.name for o in sess.model.graph.output]
    out_i = names.index(sess.output_names[0])
    print(f"# {args.model}, {args.scheme}, precision {prec}, {len(gemm_sites)} protected GEMM sites, {len(bias_sites)} bias adds, "
          f"{args.trials} single faults per cell, seed {args.seed}, thresholds: "
          f"{'calibrated on %d images' % args.calibrate if args.calibrate else 'rounding bound'}")
    print(f"{'bit':>3} " + " ".join(f"{k + ' det%':>16} {'wrong%':>6}" for k in KINDS))
    cache = {}
    totals = {k: [0, 0, 0] for k in KINDS}
    for bit in range(32):
        cells = []
        for kind in KINDS:
            det = wrong = n = 0
            for _ in range(args.trials):
                img = int(rng.integers(len(x)))
                feeds = {"x": x[img:img + 1]}
                if img not in cache:
                    clean, plans = sess.clean(feeds)
                    cache[img] = (clean[0], plans)
                clean, plans = cache[img]
                pool = bias_sites if kind == "bias add" else gemm_sites
                if not pool:
                    continue
                i = int(rng.choice(pool))
                plan = plans[i]
                site = table[i]
                if kind == "bias add":
                    step, width = 0, site.widths["element"]
                else:
                    k = plan.k
                    step = {"product": int(rng.integers(k)),
                            "partial sum": int(k + rng.integers(max(k - 2, 1))) if k > 2 else k - 1,
                            "final sum": 2 * k - 2}[kind]
                    width = site.widths["product" if step < k else "sum"]
                if bit >= width:
                    continue
                f = Faults(np.array([i]), np.array([0]), np.array([int(rng.integers(plan.elements))]),
                           np.array([step]), np.array([bit]))
                full = dict(feeds)
                full.update(fault_feeds(plans, f))
                flag = f"onnxft.abft.{by_output[site.node]}.detected"
                outs = sess.session_for(feeds).run([names[out_i], flag], full)
                n += 1
                det += bool(outs[1])
                err = np.abs(outs[0] - clean)
                wrong += bool(err.max() > 1e-5 * np.abs(clean).max())
            totals[kind][0] += det
            totals[kind][1] += wrong
            totals[kind][2] += n
            cells.append(f"{(100 * det / n if n else float('nan')):>16.0f} {(100 * wrong / n if n else float('nan')):>6.0f}")
        print(f"{bit:>3} " + " ".join(cells), flush=True)
    print("all " + " ".join(f"{(100 * d / n if n else float('nan')):>16.1f} {(100 * w / n if n else float('nan')):>6.1f}"
                            for d, w, n in totals.values()))
    return totals


if __name__ == "__main__":
    sys.exit(main())
