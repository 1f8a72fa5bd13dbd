"""The device's ridge point as onnxruntime sees it: peak GEMM FLOP/s over memory bandwidth.

A short micro-benchmark on the target provider (seed 004's roofline test):

- **peak GEMM rate**: a square fp32 MatMul (``gemm_size`` cubed, 2 n^3 operations), median of
  ``repeats`` runs after a warm-up;
- **bandwidth**: an elementwise Add of two ``stream_mb`` MB fp32 vectors into a third (3 x the
  vector's bytes per run), large enough to leave the caches, median as above.

ridge = FLOP/s / (bytes/s), in FLOP per byte. The result is cached per machine, provider, thread
count and onnxruntime version in ``~/.cache/onnxft/ridge.json`` (``ONNXFT_CACHE`` moves it), so a
harden run measures it once; ``--ridge F`` overrides it. Both figures are what a session of this
onnxruntime build achieves with these settings, not vendor peaks: that is the ratio the choice
between ABFT implementations depends on.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def cache_path() -> Path:
    return Path(os.environ.get("ONNXFT_CACHE", Path.home() / ".cache" / "onnxft")) / "ridge.json"


def _key(provider: str, threads: int | None) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{socket.gethostname()}|{cpu}|{provider}|threads={threads or 'default'}|ort={ort.__version__}"


def _graph(op: str, shape_a, shape_b, shape_y) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], op.lower(),
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape_a),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, shape_b)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_y)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _median_seconds(sess, feeds, repeats: int) -> float:
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_ridge(provider: str = "cpu", threads: int | None = None, gemm_size: int = 1024, stream_mb: int = 64,
                  repeats: int = 7) -> dict:
    """Run the micro-benchmark (about a second on a CPU) and return its figures."""
    from .session import make_session

    n = int(gemm_size)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    sess = make_session(_graph("MatMul", [n, n], [n, n], [n, n]), provider, threads, level="basic")
    flops = 2.0 * n ** 3 / _median_seconds(sess, {"a": a, "b": a}, repeats)
    length = int(stream_mb) * 2**20 // 4
    v = rng.standard_normal(length, dtype=np.float32)
    sess = make_session(_graph("Add", [length], [length], [length]), provider, threads, level="basic")
    bandwidth = 3.0 * 4 * length / _median_seconds(sess, {"a": v, "b": v}, repeats)
    return {"provider": sess.get_providers()[0], "threads": threads, "gemm_flops": flops, "bandwidth": bandwidth,
            "ridge": flops / bandwidth, "gemm_size": n, "stream_mb": int(stream_mb), "measured": time.time()}


def ridge_point(provider: str = "cpu", threads: int | None = None, override: float | None = None,
                refresh: bool = False) -> dict:
    """The ridge point for ``provider``: ``override`` if given, else the cached measurement, else a
    new one (then cached). Returns the figures with ``"source"``: ``override``, ``cache`` or ``measured``."""
    if override is not None:
        if not (override > 0 and np.isfinite(override)):
            raise ValueError(f"--ridge must be a positive number of FLOP per byte, got {override}")
        return {"ridge": float(override), "source": "override", "provider": provider, "threads": threads}
    path, key = cache_path(), _key(provider, threads)
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # a damaged cache is re-measured, never an error
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("ridge", 0) > 0:
        return dict(cache[key], source="cache")
    figures = measure_ridge(provider, threads)
    cache[key] = figures
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return dict(figures, source="measured")
