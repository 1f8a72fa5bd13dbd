"""False detections of ABFT on fault-free data: the 2000 bundled test images, fp32 and int8 ViT.

    python benchmarks/abft_false_alarms.py                  # vit and vit_int8, lb, both threshold kinds
    python benchmarks/abft_false_alarms.py --calib 500      # calibrate on the first 500 images
    python benchmarks/abft_false_alarms.py --precision tf32 --level all   # harden's default, a server's level

Thresholds: the rounding bound (default of ``abft``), and ``calibrate_abft`` on the first
``--calib`` images (then every image counts; the first ``--calib`` ones are also reported apart
as "seen"). Prints, per model and threshold kind, the number of (image, GEMM) pairs flagged and the
largest residual ratio over tau seen in calibration.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort

from onnxft import samples
from onnxft.campaigns.calibrate_abft import calibrate_abft
from onnxft.passes.abft import abft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit_int8")
    ap.add_argument("--calib", type=int, default=500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--precision", default="fp32", help="serving precision of the thresholds (fp32, tf32, fp16, fp16acc32, bf16)")
    ap.add_argument("--level", default="basic", choices=["disabled", "basic", "extended", "all"],
                    help="onnxruntime optimisation level of the sessions")
    args = ap.parse_args(argv)
    x = np.load(samples.sample_data_path())["x"]
    print(f"# {len(x)} images; calibration on the first {args.calib}; batch {args.batch}; lb; precision "
          f"{args.precision}; ORT level {args.level}")
    print(f"{'model':<9} {'thresholds':<11} {'GEMMs':>5} {'flagged (img,GEMM)':>18} {'in calib imgs':>13} {'max tau':>9}")
    for name in args.models.split(","):
        model = onnx.load(samples.sample_model(name)["path"])
        cal = calibrate_abft(model, [{"x": x[i:i + args.batch]} for i in range(0, args.calib, args.batch)],
                             precision=args.precision)
        for kind, thresholds in (("bound", None), ("calibrated", cal)):
            r = abft(model, scheme="lb", thresholds=thresholds, expose_flags=True, precision=args.precision)
            so = ort.SessionOptions()
            so.graph_optimization_level = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                           "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[args.level]
            s = ort.InferenceSession(r.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            det = [o.name for o in s.get_outputs() if o.name.endswith(".detected")]
            flagged = seen = 0
            for i in range(len(x)):  # batch 1: the flag is per image
                outs = s.run(det, {"x": x[i:i + 1]})
                hits = sum(bool(v) for v in outs)
                flagged += hits
                seen += hits if i < args.calib else 0
            taus = max(g["tau"] for g in r.details["gemms"])
            print(f"{name:<9} {kind:<11} {len(det):>5} {flagged:>18} {seen:>13} {taus:>9.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
