"""Where onnxruntime's CUDA provider places each node of a model and of its injection graph.

    python benchmarks/gpu/cuda_placement.py vit vit_int8 [model.hardened.onnx] [--json out.json]

Placement is decided when a session is created (graph partitioning: which provider has a kernel for
each node, which shape nodes onnxruntime prefers on the CPU, where Memcpy nodes are needed), not
when it runs. So it can be read on a machine WITHOUT a GPU: with ``--shim`` (the default where
/dev/nvidia* is absent) this script compiles throw-away shim libraries that stand in for
libcudart/libcublas/libcublasLt/libcurand/libcuda (every function returns success and a dummy
handle), so that onnxruntime-gpu's real libonnxruntime_providers_cuda.so loads and partitions the
graph exactly as on a GPU. Nothing is run: the shim is only good for creating sessions (needs gcc
and nm). On a GPU machine the real libraries are used.

For the original model and its injection graph (static input shapes, optimisation level basic, as
onnxft's campaigns open them) it reports: nodes per provider over all graphs (subgraphs included)
and the op types placed on the CPU; Memcpy nodes per graph (``main_graph`` is the fault-free path;
``faulty`` are the then-branches of the fault operators, ``single``/``rank_step`` their Loop
bodies); the top-level node count (kernels launched per fault-free run, besides the branches that
If nodes take); and the CUDA provider's effective options (``use_tf32`` ...).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Functions whose callers read what they return through pointers (device count, handles, memory).
_SHIM_SPECIAL = {
    "__cudaRegisterFatBinary": "void* {n}(void* a) {{ return (void*)buf; }}",
    "cudaGetDeviceCount": "int {n}(int* c) {{ *c = 1; return 0; }}",
    "cudaGetDevice": "int {n}(int* d) {{ *d = 0; return 0; }}",
    "cudaDeviceGetAttribute": "int {n}(int* v, int a, int d) {{ *v = 0; return 0; }}",
    "cudaGetDeviceProperties": "int {n}(void* p, int d) {{ memset(p, 0, 1032); memcpy(p, \"shim\", 5); return 0; }}",
    "cudaMalloc": "int {n}(void** p, size_t s) {{ *p = malloc(s ? s : 1); return 0; }}",
    "cudaMallocHost": "int {n}(void** p, size_t s) {{ *p = malloc(s ? s : 1); return 0; }}",
    "cudaHostAlloc": "int {n}(void** p, size_t s, unsigned f) {{ *p = malloc(s ? s : 1); return 0; }}",
    "cudaStreamCreate": "int {n}(void** s) {{ *s = (void*)buf; return 0; }}",
    "cudaStreamCreateWithFlags": "int {n}(void** s, unsigned f) {{ *s = (void*)buf; return 0; }}",
    "cudaEventCreate": "int {n}(void** s) {{ *s = (void*)buf; return 0; }}",
    "cudaEventCreateWithFlags": "int {n}(void** s, unsigned f) {{ *s = (void*)buf; return 0; }}",
    "cudaMemPoolCreate": "int {n}(void** p, const void* q) {{ *p = (void*)buf; return 0; }}",
    "cudaStreamIsCapturing": "int {n}(void* s, int* st) {{ *st = 0; return 0; }}",
    "cudaMemGetInfo": "int {n}(size_t* f, size_t* t) {{ *f = *t = (size_t)1 << 34; return 0; }}",
    "cudaDriverGetVersion": "int {n}(int* v) {{ *v = 13000; return 0; }}",
    "cudaRuntimeGetVersion": "int {n}(int* v) {{ *v = 13000; return 0; }}",
    "cublasCreate_v2": "int {n}(void** h) {{ *h = (void*)buf; return 0; }}",
    "cublasLtCreate": "int {n}(void** h) {{ *h = (void*)buf; return 0; }}",
    "cudaGetErrorName": "const char* {n}(int e) {{ return \"shim\"; }}",
    "cudaGetErrorString": "const char* {n}(int e) {{ return \"shim\"; }}",
    "cublasGetStatusName": "const char* {n}(int e) {{ return \"shim\"; }}",
    "cublasGetStatusString": "const char* {n}(int e) {{ return \"shim\"; }}",
}


def _cuda_provider_lib() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("cuda_placement: onnxruntime is not importable")
    lib = Path(list(spec.submodule_search_locations)[0]) / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.is_file():
        sys.exit(f"cuda_placement: {lib} not found (this needs onnxruntime-gpu)")
    return lib


def build_shims(lib: Path) -> Path:
    """Shim libraries for every library ``lib`` needs from CUDA, with the versioned symbols it imports."""
    key = hashlib.sha256(f"{lib}:{lib.stat().st_size}:{lib.stat().st_mtime}".encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"onnxft-cuda-shim-{key}"
    if (out / "done").is_file():
        return out
    out.mkdir(exist_ok=True)
    needed = re.findall(r"\(NEEDED\).*\[(lib(?:cuda|cudart|cublas|cublasLt|curand|cufft|cudnn|nvrtc)\.so[.\d]*)\]",
                        subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                               check=True).stdout.split()
    by_lib = collections.defaultdict(list)
    for sym in undefined:
        if "@" in sym:
            name, _, ver = sym.partition("@")
            if ver.lstrip("@") in needed:
                by_lib[ver.lstrip("@")].append(name)
        elif sym.startswith("cu") and sym[2:3].isupper():  # driver API, unversioned
            by_lib["libcuda.so.1"].append(sym)
    for soname in needed:
        names = sorted(set(by_lib.get(soname, [])))
        body = ["#include <stdlib.h>", "#include <string.h>", "static long buf[4096];",
                "int onnxft_shim_marker(void) { return 0; }"]
        body += [_SHIM_SPECIAL.get(n, "long {n}(void) {{ return 0; }}").format(n=n) for n in names]
        src = out / f"{soname}.c"
        src.write_text("\n".join(body) + "\n")
        cmd = ["gcc", "-w", "-shared", "-fPIC", "-o", str(out / soname), str(src), f"-Wl,-soname,{soname}"]
        if soname != "libcuda.so.1":
            (out / f"{soname}.map").write_text(f"{soname} {{ global: *; }};\n")
            cmd.append(f"-Wl,--version-script={out / f'{soname}.map'}")
        subprocess.run(cmd, check=True)
    (out / "done").write_text("ok\n")
    return out


_CHILD = r"""
import glob, sys, json, onnxruntime as ort
if hasattr(ort, "preload_dlls") and glob.glob("/dev/nvidia[0-9]*"):
    ort.preload_dlls(directory="")  # as onnxft.runtime.session does: CUDA/cuDNN from the nvidia packages
so = ort.SessionOptions()
so.log_severity_level = 0
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = sys.argv[2]
s = ort.InferenceSession(sys.argv[1], so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(json.dumps({"providers": s.get_providers(), "cuda_options": s.get_provider_options().get("CUDAExecutionProvider", {})}))
"""


def placement(model_path: str, shim: Path | None) -> dict:
    """Create a CUDA session for ``model_path`` in a child process and parse its verbose log."""
    import onnx

    env = dict(os.environ)
    if shim is not None:
        env["LD_LIBRARY_PATH"] = f"{shim}:{env.get('LD_LIBRARY_PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="onnxft-place-") as td:
        opt = os.path.join(td, "optimized.onnx")
        p = subprocess.run([sys.executable, "-c", _CHILD, model_path, opt], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"session creation failed ({p.returncode}): {p.stderr[-2000:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        top = collections.Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
    nodes, cpu_ops, ep = collections.Counter(), collections.Counter(), None
    memcpy = collections.Counter()
    for line in p.stderr.splitlines():
        m = re.search(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            ep = m.group(1)
            nodes[ep] += int(m.group(2))
            continue
        m = re.search(r"VerifyEachNodeIsAssignedToAnEp\]   (\w+) \(", line)
        if m and ep == "CPUExecutionProvider":
            cpu_ops[m.group(1)] += 1
            continue
        m = re.search(r"(\d+) Memcpy nodes are added to the graph (\S+) for", line)
        if m:
            memcpy[m.group(2)] += int(m.group(1))
    opts = info["cuda_options"]
    return {"providers": info["providers"], "nodes": dict(nodes), "cpu_ops": dict(cpu_ops.most_common()),
            "memcpy_by_graph": dict(memcpy.most_common()), "top_level_nodes": sum(top.values()),
            "top_level_if": top.get("If", 0),
            "top_level_memcpy": top.get("MemcpyToHost", 0) + top.get("MemcpyFromHost", 0),
            "use_tf32": opts.get("use_tf32"), "cudnn_conv_algo_search": opts.get("cudnn_conv_algo_search")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["vit", "vit_int8"], help="sample names or .onnx paths")
    ap.add_argument("--batch", type=int, default=8, help="static batch of the sessions (default %(default)s)")
    ap.add_argument("--shim", choices=("auto", "yes", "no"), default="auto",
                    help="stand-in CUDA libraries (auto: when there is no /dev/nvidia*)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    import onnx

    import onnxft.api as ft
    from onnxft.passes.inject import inject
    from onnxft.report.outputs import atomic_write
    from onnxft.runtime.data import fixed_batch, input_specs, synthetic
    from onnxft.runtime.session import with_static_inputs

    use_shim = args.shim == "yes" or (args.shim == "auto" and not any(Path("/dev").glob("nvidia[0-9]*")))
    shim = build_shims(_cuda_provider_lib()) if use_shim else None
    reports = []
    with tempfile.TemporaryDirectory(prefix="onnxft-place-") as td:
        for name in args.models:
            m, _, _ = ft.load(name)
            feeds = synthetic(input_specs(m), fixed_batch(input_specs(m)) or args.batch, 0)
            rep = {"model": name, "shim": use_shim}
            for kind, model in (("original", m), ("injection", inject(m).model)):
                path = os.path.join(td, f"{kind}.onnx")
                onnx.save(with_static_inputs(model, feeds), path)
                rep[kind] = placement(path, shim)
            reports.append(rep)
            print(f"\n== {name} (static batch {len(next(iter(feeds.values())))}, level basic"
                  f"{', shim CUDA libraries' if use_shim else ''})")
            for kind in ("original", "injection"):
                r = rep[kind]
                print(f"  {kind:<9} nodes per provider {r['nodes']}; top-level nodes {r['top_level_nodes']}"
                      f" (If {r['top_level_if']}, Memcpy {r['top_level_memcpy']}); use_tf32={r['use_tf32']}")
                print(f"  {'':<9} on CPU: {r['cpu_ops']}")
                print(f"  {'':<9} Memcpy nodes by graph: {r['memcpy_by_graph']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
