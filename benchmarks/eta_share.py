"""How much of each ABFT row test's scale the absolute underflow term ``eta`` takes on real data.

    OMP_NUM_THREADS=1 python benchmarks/eta_share.py --model /work/models/real/minilm_l3_fp16.onnx \\
        --data /work/models/real/minilm_l3_fp16.npz --precision fp16acc32

Runs the model's items through the calibration probe (``abft(..., unit_scale=True)``: each unit's
``scale`` output is exactly ``|A| @ |B| e`` of every row, eta left out) and prints, per GEMM, the
share ``eta / (tau |A||B|e + eta)`` of the hardened test's scale that is eta: the median and the
largest over rows, and the rows where eta is more than half. ``tau`` and ``eta`` are the plan's
(static dimensions; for a dynamic one the plan's values at the first item's shape). A share near 0
means eta changes nothing the test detects; near 1, the row is checked against its underflow error.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxft.passes.abft import abft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help=".npz, one row per item, arrays named after the model inputs")
    ap.add_argument("--precision", default="fp16acc32")
    args = ap.parse_args(argv)
    model = onnx.load(args.model)
    data = dict(np.load(args.data))
    n = len(next(iter(data.values())))
    items = [{k: v[i:i + 1] for k, v in data.items()} for i in range(n)]
    shapes = {k: list(v.shape) for k, v in items[0].items()}
    plan = {g["name"]: g for g in abft(model, scheme="lb", precision=args.precision, shapes=shapes).details["gemms"]}
    probe = abft(model, scheme="lb", unit_scale=True, precision=args.precision, shapes=shapes)
    m = probe.model
    units = [g for g in probe.details["gemms"] if g["scale"]]
    m.graph.output.extend([helper.make_tensor_value_info(g["scale"], onnx.TensorProto.FLOAT, None) for g in units])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    scales = {g["name"]: [] for g in units}
    for item in items:
        outs = s.run([g["scale"] for g in units], {k: v for k, v in item.items() if k in names})
        for g, v in zip(units, outs):
            scales[g["name"]].append(v.reshape(-1).astype(np.float64))
    print(f"# {args.model}, {n} items, precision {args.precision}")
    print(f"{'GEMM':<48} {'K':>5} {'N':>5} {'tau':>9} {'eta':>9} {'median share':>12} {'max share':>9} "
          f"{'rows > 1/2':>10}")
    for g in units:
        p = plan[g["name"]]
        mag = np.concatenate(scales[g["name"]])
        share = p["eta"] / (p["tau"] * mag + p["eta"])
        print(f"{g['name'][-48:]:<48} {str(p['K']):>5} {str(p['N']):>5} {p['tau']:>9.2e} {p['eta']:>9.2e} "
              f"{np.median(share):>12.2e} {share.max():>9.2e} {int((share > 0.5).sum()):>4}/{share.size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
