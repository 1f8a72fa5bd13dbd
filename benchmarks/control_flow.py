"""A model whose network sits in control flow (silero VAD: an If on the sample rate, an LSTM inside):
its sites, how often each ran, BER 0 against the original model, outcomes at a BER, and time per run.

    python benchmarks/control_flow.py --model /work/models/real/silero_vad.onnx \
        --data /work/models/real/silero_vad.npz --ber 1e-5 --trials 20

``--data``: an .npz with one array per model input, fed whole (one batch). The injection graph is
the campaigns' (fault-free fast path, transposed weights), run on one ORT thread; times are medians
of runs of the original model, the injection graph at BER 0 and with faults, interleaved.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from onnxft.campaigns.evaluate import campaign_graph
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.runtime.model_io import load_model
from onnxft.runtime.session import InjectionSession, make_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ber", type=float, default=1e-5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model = load_model(args.model)
    feeds = dict(np.load(args.data))
    graph = campaign_graph(model)
    sess = InjectionSession(graph, "cpu", threads=1)
    plans = sess.plans(feeds)
    ran = [p for p in plans if p.operations_per_item > 0]
    print(f"{len(plans)} sites ({sum(p.executions is not None for p in plans)} inside control flow), "
          f"{len(ran)} ran on this input")
    for p in ran:
        runs = len(p.executions) if p.executions is not None else 1
        print(f"  {p.site.id} {p.site.op_type:<10} ran {runs}x  {p.operations_per_item * p.items:>12,} operations  "
              f"{p.site.node}")
    plain = make_session(model, "cpu", threads=1, level="basic")
    original = plain.run(None, feeds)
    clean = sess.run(feeds, Faults.empty(), plans)
    print("BER 0 vs original, max abs difference per output:",
          [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(clean, original)])
    faults = [sample_faults(plans, args.ber, np.random.default_rng(seed)) for seed in range(args.trials)]
    changed = non_finite = 0
    for f in faults:
        out = sess.run(feeds, f, plans)
        bad = any(not np.isfinite(o).all() for o in out)
        non_finite += bad
        changed += bad or any(not np.array_equal(o, c) for o, c in zip(out, clean))
    print(f"BER {args.ber:g}, {args.trials} trials: flips per trial mean {np.mean([len(f) for f in faults]):.1f}; "
          f"trials with a changed output {changed}/{args.trials}, with NaN/Inf {non_finite}/{args.trials}")
    times = {"original": [], "BER 0": [], f"BER {args.ber:g}": []}
    for i in range(args.repeats):
        for key, run in (("original", lambda: plain.run(None, feeds)),
                         ("BER 0", lambda: sess.run(feeds, Faults.empty(), plans)),
                         (f"BER {args.ber:g}", lambda: sess.run(feeds, faults[i % len(faults)], plans))):
            t = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t)
    print("median time per run:", ", ".join(f"{k} {np.median(v) * 1e3:.2f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
