"""Cost of the gathered convolution fault operator (ConvGatherFaults: 1-D/3-D Conv, ConvTranspose)
against the offset form of plain 2-D Conv (ConvFaults), on the same convolution written as 1-D
[N, C, W] and as 2-D [N, C, 1, W], with the same number of faults. Interleaved runs, medians.

    python benchmarks/conv_gather.py                      # C=64, W=4096, kernel 9, BER 1e-6
    python benchmarks/conv_gather.py --ber 1e-5 --repeats 15
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxft.faults.sampling import fault_feeds, sample_faults
from onnxft.passes.inject import inject
from onnxft.runtime.session import InjectionSession


def conv_model(c: int, w: int, k: int, two_d: bool, weight: np.ndarray):
    x_shape = [1, c, 1, w] if two_d else [1, c, w]
    wt = weight[:, :, None, :] if two_d else weight
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[0, k // 2, 0, k // 2] if two_d else [k // 2] * 2)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(wt, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), x_shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--kernel", type=int, default=9)
    ap.add_argument("--ber", type=float, default=1e-6)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((a.channels, a.channels, a.kernel)).astype(np.float32)
    x1 = rng.standard_normal((1, a.channels, a.width)).astype(np.float32)
    runs = {}
    for name, two_d in (("ConvFaults (2-D)", True), ("ConvGatherFaults (1-D)", False)):
        model, shape = conv_model(a.channels, a.width, a.kernel, two_d, weight)
        sess = InjectionSession(inject(model).model, "cpu", threads=1)
        feeds = {"x": x1.reshape(shape)}
        plans = sess.plans(feeds)
        faults = sample_faults(plans, a.ber, np.random.default_rng(1))
        runs[name] = (sess, feeds, plans, faults)
    times = {n: {"feeds": [], "run": []} for n in runs}
    for _ in range(a.repeats):
        for n, (sess, feeds, plans, faults) in runs.items():
            t0 = time.perf_counter()
            fault_feeds(plans, faults)
            t1 = time.perf_counter()
            sess.run(feeds, faults, plans)
            t2 = time.perf_counter()
            times[n]["feeds"].append(t1 - t0)
            times[n]["run"].append(t2 - t1)
    print(f"C={a.channels} W={a.width} kernel={a.kernel} K={a.channels * a.kernel} BER={a.ber:g}")
    print(f"{'operator':<24} {'faults':>7} {'fault_feeds ms':>15} {'run ms':>8}")
    for n, (_, _, _, faults) in runs.items():
        print(f"{n:<24} {len(faults):>7} {statistics.median(times[n]['feeds']) * 1e3:>15.2f} "
              f"{statistics.median(times[n]['run']) * 1e3:>8.2f}")


if __name__ == "__main__":
    main()
