"""False detections of ABFT on a float16 text encoder's fault-free inputs, per precision and level.

    OMP_NUM_THREADS=1 python benchmarks/fp16_false_alarms.py --model /work/models/real/minilm_l3_fp16.onnx \\
        --data /work/models/real/minilm_l3_fp16.npz --precision fp16acc32,tf32 --level disabled,all --random 64

The model is protected as ``harden`` does it (``abft``, LB, block sizes at the first item's shape)
with its detection flags exposed, and run one item at a time on: the items of ``--data`` (the last
quarter are harden's held-out items, the others its calibration items; neither tunes a float16
threshold, which is always a rounding bound), and ``--random`` new token sequences (the first and
last token of a data item around uniform random ids below ``--vocab``, lengths 3..``--max-len``, so
the dynamic sequence axis takes shapes no item had). Prints, per precision and level, the number of
(input, GEMM/Conv) pairs flagged; each must be 0.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort

from onnxft.passes.abft import abft

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def token_items(data: dict, n: int, vocab: int, max_len: int, seed: int = 0) -> list[dict]:
    """``n`` random sequences framed by a data item's first and last real token."""
    rng = np.random.default_rng(seed)
    ids, mask = data["input_ids"], data["attention_mask"]
    out = []
    for i in range(n):
        j = i % len(ids)
        last = ids[j][int(mask[j].sum()) - 1]
        length = int(rng.integers(3, max_len + 1))
        seq = np.concatenate([[ids[j][0]], rng.integers(1000, vocab, length - 2), [last]]).astype(ids.dtype)
        item = {"input_ids": seq[None], "attention_mask": np.ones((1, length), mask.dtype)}
        for k, v in data.items():  # (token_type_ids and the like: zeros)
            item.setdefault(k, np.zeros((1, length), v.dtype))
        out.append(item)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help=".npz of input_ids, attention_mask (one row per item)")
    ap.add_argument("--precision", default="fp16acc32,tf32")
    ap.add_argument("--level", default="disabled,all")
    ap.add_argument("--random", type=int, default=64, help="random token sequences besides the data's items")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--max-len", type=int, default=64)
    args = ap.parse_args(argv)
    model = onnx.load(args.model)
    data = dict(np.load(args.data))
    n_items = len(data["input_ids"])
    held_out = set(range(n_items - max(1, n_items // 4), n_items))
    items = [{k: v[i:i + 1] for k, v in data.items()} for i in range(n_items)] + token_items(
        data, args.random, args.vocab, args.max_len)
    shapes = {k: list(v.shape) for k, v in items[0].items()}
    print(f"# {args.model}: {n_items} data items ({len(held_out)} held out by harden) + {args.random} random "
          f"sequences (3..{args.max_len} tokens); lb; one item per run")
    print(f"{'precision':<10} {'level':<9} {'units':>5} {'max tau':>9} {'max eta':>9} {'flagged (item,unit)':>19} "
          f"{'held-out':>8} {'random':>6}")
    for prec in args.precision.split(","):
        r = abft(model, scheme="lb", expose_flags=True, precision=prec, shapes=shapes)
        taus = [g["tau"] for g in r.details["gemms"] + r.details.get("convs", [])]
        etas = [g["eta"] or 0.0 for g in r.details["gemms"] + r.details.get("convs", [])]
        for level in args.level.split(","):
            so = ort.SessionOptions()
            so.graph_optimization_level = LEVELS[level]
            s = ort.InferenceSession(r.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            det = [o.name for o in s.get_outputs() if o.name.endswith(".detected")]
            names = {i.name for i in s.get_inputs()}
            flagged = held = rand = 0
            for i, item in enumerate(items):
                hits = sum(bool(v) for v in s.run(det, {k: v for k, v in item.items() if k in names}))
                flagged += hits
                held += hits if i in held_out else 0
                rand += hits if i >= n_items else 0
            print(f"{prec:<10} {level:<9} {len(det):>5} {max(taus):>9.2e} {max(etas):>9.2e} {flagged:>19} {held:>8} "
                  f"{rand:>6}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
