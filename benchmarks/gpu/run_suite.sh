#!/usr/bin/env bash
# The CUDA checks and benchmarks of docs/cuda.md, for a list of models, on the lent GPU machine.
#   bash benchmarks/gpu/setup_ort.sh            # once per machine (onnxruntime-gpu into /tmp/site)
#   bash benchmarks/gpu/run_suite.sh OUTDIR [MODEL ...]   # default models: vit vit_int8
# MODEL: a bundled sample name or an .onnx path (e.g. a hardened model); path models are evaluated on
# $DATA (default: the bundled Fashion-MNIST test set). Environment knobs (defaults in brackets):
#   SECTIONS [place check eval bench]   BERS [0,1e-9,1e-8,1e-7]   LIMIT [1000]   BATCH [250]
#   EVAL_PROVIDERS [cuda cpu]     BENCH_MODELS [vit,vit-b16]   BENCH_BERS [0,1e-10,1e-8]   BENCH_REPEATS [20]
set -uo pipefail
out=${1:?usage: run_suite.sh OUTDIR [MODEL ...]}; shift
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(vit vit_int8)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-$PWD/onnxft/data/samples/fashion_mnist_test.npz}
SECTIONS=${SECTIONS:-place check eval bench}
mkdir -p "$out"
comma=$(IFS=,; echo "${models[*]}")
rc=0
section() { echo; echo "#### $1  ($(date -u +%T))"; }
timed() { local t0=$EPOCHREALTIME; "$@"; local r=$?
  echo "# exit $r, $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s: $*"; return $r; }
has_path=0; for m in "${models[@]}"; do [[ $m == *.onnx ]] && has_path=1; done
data_opt=(); [ $has_path = 1 ] && data_opt=(--data "$DATA")

section "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import onnxruntime as o, onnx, numpy; print('onnxruntime', o.__version__, o.get_device(), '| onnx', onnx.__version__, '| numpy', numpy.__version__)"
git log -1 --format='commit %H %s' 2>/dev/null; git status --short 2>/dev/null | head -20

if [[ " $SECTIONS " == *" place "* ]]; then
  section "cuda_placement (${models[*]})"
  timed python3 benchmarks/gpu/cuda_placement.py "${models[@]}" --json "$out/placement.json" || rc=1
fi
if [[ " $SECTIONS " == *" check "* ]]; then
  section "cuda_check (${models[*]})"
  timed python3 benchmarks/gpu/cuda_check.py --models "$comma" "${data_opt[@]}" --json "$out/cuda_check.json" || rc=1
fi
if [[ " $SECTIONS " == *" eval "* ]]; then
  for p in ${EVAL_PROVIDERS:-cuda cpu}; do
    section "eval --provider $p"
    timed python3 -m onnxft.cli.main eval "${models[@]}" "${data_opt[@]}" --provider "$p" --ber "${BERS:-0,1e-9,1e-8,1e-7}" \
      --trials 1 --limit "${LIMIT:-1000}" --batch "${BATCH:-250}" --out "$out/eval_$p" || rc=1
  done
fi
if [[ " $SECTIONS " == *" bench "* ]]; then
  section "bench (CUDA)"
  timed python3 benchmarks/gpu/bench_providers.py --models "${BENCH_MODELS:-vit,vit-b16}" --providers cuda \
    --bers "${BENCH_BERS:-0,1e-10,1e-8}" --repeats "${BENCH_REPEATS:-20}" --json "$out/bench_cuda.json" || rc=1
fi
exit $rc
