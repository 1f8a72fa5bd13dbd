"""Injection on CUDA against injection on CPU: the same fault sets, both providers, one table.

    python benchmarks/gpu/cuda_check.py --models vit,vit_int8 --bers 1e-9,1e-8,1e-7 --batch 64
    python benchmarks/gpu/cuda_check.py --models /path/model.hardened.onnx --data test.npz --json out.json

For each model and each provider variant (``cpu``; ``cuda`` as onnxft opens it, i.e. onnxruntime's
default CUDA options; ``cuda-exact``, the CUDA provider with ``use_tf32=0``,
``cudnn_conv_algo_search=HEURISTIC`` and ``use_deterministic_compute``: onnxruntime's defaults are
TF32 for fp32 MatMul/Gemm/Conv and an EXHAUSTIVE, timing-based cuDNN algorithm search, which may
choose differently per session):

* BER 0: the injection graph with no faults must equal the original model on the same provider
  bit for bit (both at optimisation level ``basic``; the original with its dynamic shapes and the
  injection graph with static ones, as campaigns open them).
* The sites' shapes (probe run) must be the same on every provider, so one sampled fault set
  (from the CPU plans, ``trial_rng(seed, 0, 0)`` per BER) is fed to every provider.
* Faulty outputs: CUDA against CPU, per element, relative to the item's largest clean logit:
  ``max_rel``; and the fraction of items whose arg-max differs (``argmax_diff``). The fault-free
  CUDA-vs-CPU difference is the floor: a correct CUDA path keeps the faulty difference near it.
  Positions that are non-finite (Inf/NaN from exponent flips) must match too.
* Placement: one faulty run on each CUDA variant with onnxruntime's profiler on; kernels are
  counted by provider, so nodes that fall back to the CPU (and their time) are listed.

Exit status 0 when every BER-0 check is bit-identical, every provider's probe shapes agree and
every CUDA variant really ran on CUDA;
the float comparisons are reported, not judged (their scale depends on TF32).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxft.api as ft
from onnxft.campaigns.evaluate import trial_rng
from onnxft.report.outputs import atomic_write
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.passes.inject import inject
from onnxft.runtime.data import input_specs, load_npz, synthetic
from onnxft.runtime.session import InjectionSession, make_session, with_static_inputs

VARIANTS = ("cpu", "cuda", "cuda-exact")
# cuda-exact: fp32 arithmetic without TF32, deterministic cuDNN algorithm choice and kernels.
EXACT_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def ort_session(model, variant: str, profile_dir: str | None = None):
    """A session at level basic for a provider variant. ``cpu`` and ``cuda`` are opened exactly
    as onnxft opens them (runtime.session.make_session) unless profiling is asked for."""
    if variant in ("cpu", "cuda") and profile_dir is None:
        return make_session(model, variant, level="basic")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if variant == "cuda-exact":
        so.use_deterministic_compute = True
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, variant)
    opts = dict(EXACT_OPTIONS) if variant == "cuda-exact" else {}
    providers = (["CPUExecutionProvider"] if variant == "cpu"
                 else [("CUDAExecutionProvider", opts), "CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


def injection_session(inj_model, variant: str, feeds, profile_dir: str | None = None) -> InjectionSession:
    """onnxft's InjectionSession, its session for these shapes opened by ``ort_session``."""
    sess = InjectionSession(inj_model, "cpu" if variant == "cpu" else "cuda")
    sess._sessions[sess._key(feeds)] = ort_session(with_static_inputs(inj_model, feeds), variant, profile_dir)
    return sess


def plan_signature(plans) -> list:
    return [(p.site.id, tuple(p.out_shape), p.items, p.elements, p.per_op_bits, p.k, tuple(p.a_shape),
             tuple(p.b_shape)) for p in plans]


def compare(a: np.ndarray, b: np.ndarray, clean: np.ndarray) -> dict:
    """a vs b (same fault set, two providers), scaled per item by the clean output's largest |value|."""
    a2, b2, c2 = (x.reshape(len(x), -1).astype(np.float64) for x in (a, b, clean))
    fa, fb = np.isfinite(a2), np.isfinite(b2)
    both = fa & fb
    scale = np.maximum(np.abs(c2).max(axis=1, keepdims=True), 1e-30)
    rel = np.where(both, np.abs(a2 - b2) / scale, 0.0)
    return {"max_rel": float(rel.max()), "nonfinite_a": int((~fa).sum()), "nonfinite_b": int((~fb).sum()),
            "nonfinite_mismatch": int((fa != fb).sum() + (np.isnan(a2) != np.isnan(b2)).sum()),
            "argmax_diff": float(np.mean(np.argmax(np.nan_to_num(a2), 1) != np.argmax(np.nan_to_num(b2), 1))),
            "items_changed_a": int(np.sum(np.any(a2 != c2, axis=1)))}


def placement(profile_json: str) -> dict:
    """Kernel count and time (ms) by provider, and the op types run on the CPU provider."""
    events = json.loads(Path(profile_json).read_text())
    count, dur = collections.Counter(), collections.Counter()
    cpu_ops = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        prov = e.get("args", {}).get("provider", "?")
        count[prov] += 1
        dur[prov] += e.get("dur", 0) / 1e3
        if prov == "CPUExecutionProvider":
            cpu_ops[e["args"].get("op_name", "?")] += 1
    return {"kernels": dict(count), "ms": {k: round(v, 3) for k, v in dur.items()},
            "cpu_ops": dict(cpu_ops.most_common())}


def check_model(name: str, data: str | None, bers: list[float], batch: int, seed: int, variants: list[str],
                profile: bool) -> dict:
    m, path, default = ft.load(name)
    data = data or default
    if data:
        feeds = load_npz(data, input_specs(m)).batch(0, batch)
    else:
        feeds = synthetic(input_specs(m), batch, seed)
    t0 = time.perf_counter()
    inj = inject(m).model
    report = {"model": name, "batch": int(next(iter(feeds.values())).shape[0]), "variants": {},
              "inject_s": round(time.perf_counter() - t0, 2)}
    outs, sigs, sessions = {}, {}, {}
    ok = True
    for v in variants:
        t0 = time.perf_counter()
        orig = ort_session(m, v)  # as campaigns open it: dynamic shapes (evaluate.py)
        ref = orig.run(None, feeds)[0]
        sess = injection_session(inj, v, feeds)
        (clean,), plans = sess.clean(feeds)
        zero = sess.run(feeds, Faults.empty(), plans)[0]
        r = {"providers": sess._sessions[sess._key(feeds)].get_providers(),
             "ber0_equal_original": ref.tobytes() == clean.tobytes() and zero.tobytes() == clean.tobytes(),
             "setup_s": round(time.perf_counter() - t0, 2)}
        if v != "cpu":
            r["cuda_options"] = {k: opt for k, opt in orig.get_provider_options().get("CUDAExecutionProvider", {}).items()
                                 if k in ("use_tf32", "cudnn_conv_algo_search", "device_id", "use_ep_level_unified_stream")}
        if v != "cpu" and "CUDAExecutionProvider" not in r["providers"]:
            r["error"] = "the CUDA provider did not start: this variant ran on the CPU"
            ok = False
        ok &= r["ber0_equal_original"]
        outs[v] = {0.0: clean}
        sigs[v] = plan_signature(plans)
        sessions[v] = (sess, plans)
        report["variants"][v] = r
    base = variants[0]
    for v in variants[1:]:
        same = sigs[v] == sigs[base]
        report["variants"][v]["plans_equal_" + base] = same
        ok &= same
    rows = []
    plans0 = sessions[base][1]
    for ber in bers:
        faults = sample_faults(plans0, ber, trial_rng(seed, 0, 0)) if ber > 0 else Faults.empty()
        for v in variants:
            sess, plans = sessions[v]
            outs[v][ber] = sess.run(feeds, faults, plans)[0]
        for v in variants[1:]:
            row = {"ber": ber, "flips": len(faults), "a": v, "b": base}
            row.update(compare(outs[v][ber], outs[base][ber], outs[base][0.0]))
            rows.append(row)
    # the fault-free floor: CUDA vs CPU with no faults
    for v in variants[1:]:
        row = {"ber": 0.0, "flips": 0, "a": v, "b": base}
        row.update(compare(outs[v][0.0], outs[base][0.0], outs[base][0.0]))
        rows.insert(0, row)
    report["rows"] = rows
    if profile:
        top = max(bers)
        faults = sample_faults(plans0, top, trial_rng(seed, 0, 0))
        with tempfile.TemporaryDirectory(prefix="onnxft-prof-") as td:
            for v in variants:
                if v == "cpu":
                    continue
                sess = injection_session(inj, v, feeds, profile_dir=td)
                plans = sess.plans(feeds)
                sess.run(feeds, faults, plans)
                prof = sess._sessions[sess._key(feeds)].end_profiling()
                report["variants"][v]["placement_at_ber"] = top
                report["variants"][v]["placement"] = placement(prof)
    report["ok"] = bool(ok)
    return report


def print_report(rep: dict) -> None:
    print(f"\n== {rep['model']}  batch {rep['batch']}  (inject {rep['inject_s']} s)")
    for v, r in rep["variants"].items():
        extra = {k: r[k] for k in r if k not in ("placement",)}
        print(f"  {v:<12} {json.dumps(extra)}")
        if "placement" in r:
            print(f"  {'':<12} placement at BER {r['placement_at_ber']:.0e}: {json.dumps(r['placement'])}")
    print(f"  {'BER':>7} {'flips':>6}  {'a vs b':<20} {'max_rel':>10} {'argmax_diff':>11} {'nonfinite a/b/mismatch':>22}"
          f" {'items changed':>13}")
    for row in rep["rows"]:
        print(f"  {row['ber']:>7.0e} {row['flips']:>6}  {row['a'] + ' vs ' + row['b']:<20} {row['max_rel']:>10.2e}"
              f" {row['argmax_diff']:>11.4f} {row['nonfinite_a']:>8}/{row['nonfinite_b']}/{row['nonfinite_mismatch']:<6}"
              f" {row['items_changed_a']:>13}")
    print(f"  verdict: {'OK' if rep['ok'] else 'FAILED'} (BER 0 bit-identical to the original on every provider,"
          " probe shapes equal)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,vit_int8", help="comma list of sample names or .onnx paths")
    ap.add_argument("--data", default=None, help=".npz for every model (default: the sample's own, else synthetic)")
    ap.add_argument("--bers", default="1e-9,1e-8,1e-7")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of %s; the first is the reference"
                    % "/".join(VARIANTS))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    bers = [float(b) for b in args.bers.split(",")]
    reports, ok = [], True
    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        rep = check_model(name, args.data, bers, args.batch, args.seed, variants, not args.no_profile)
        print_report(rep)
        reports.append(rep)
        ok &= rep["ok"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(reports, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
