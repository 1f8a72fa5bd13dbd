#!/usr/bin/env bash
# Install onnxruntime-gpu 1.31.1 (CUDA 13 build) on the lent GPU machine into /tmp/site, from the wheel's
# parts already copied to /tmp/ortparts (part.0 ... part.4: one per call from .whl1 ... .whl5, see docs/cuda.md).
# Then check that a session really runs on CUDAExecutionProvider. Run from the repository root.
#   bash benchmarks/gpu/setup_ort.sh && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
WHL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
SHA=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then
  cat /tmp/ortparts/part.* > "$WHL"
  echo "$SHA  $WHL" | sha256sum -c -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"
fi
# onnxruntime.preload_dlls() (called by onnxft) looks for the CUDA 13 and cuDNN 9 libraries in
# <site of onnxruntime>/nvidia/{cu13,cudnn}/lib. The image has them in the torch environment's nvidia
# packages: link each of them into /tmp/site/nvidia.
mkdir -p /tmp/site/nvidia
python3 - <<'PY'
import os, nvidia
for root in list(nvidia.__path__):
    for d in sorted(os.listdir(root)):
        src, dst = os.path.join(root, d), os.path.join("/tmp/site/nvidia", d)
        if os.path.isdir(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
print("nvidia packages linked:", sorted(os.listdir("/tmp/site/nvidia")))
PY
# Diagnostic: libraries the CUDA provider still cannot resolve from those folders (expect none).
LD_LIBRARY_PATH=$(ls -d /tmp/site/nvidia/*/lib 2>/dev/null | tr '\n' ':') \
  ldd /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so | grep "not found" || true
PYTHONPATH=/tmp/site:$PWD python3 - <<'PY'
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto as T
ort.preload_dlls(directory="")
print("onnxruntime", ort.__version__, ort.__file__, "available:", ort.get_available_providers())
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                      [helper.make_tensor_value_info(n, T.FLOAT, [64, 64]) for n in "ab"],
                      [helper.make_tensor_value_info("y", T.FLOAT, [64, 64])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
assert "CUDAExecutionProvider" in s.get_providers(), s.get_providers()
a = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
y = s.run(None, {"a": a[0], "b": a[1]})[0]
print("session providers:", s.get_providers())
print("CUDA options:", s.get_provider_options()["CUDAExecutionProvider"])
print("MatMul 64x64x64 max |CUDA - float64| =", float(np.abs(y - a[0].astype(np.float64) @ a[1]).max()))
import onnxft.custom_ops
print("onnxft.custom_ops from", onnxft.custom_ops.__file__)
PY
