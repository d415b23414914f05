#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go, on a bare CUDA machine with torch + Triton (about 5-7 minutes on an H100):
#   1. the kernel tests on CUDA (tests/kernels: decode attention, int8, graph decode, fused MoE, GPU-only);
#   2. benchmarks/moe_layer.py (one MoE layer, four implementations);
#   3. benchmarks/decode.py, all modes: eager (PyTorch loop, Triton MoE), static cache + CUDA graph with
#      masked attention, the same with span attention, int8 weights + span; the int8-vs-bf16 report;
#   4. benchmarks/profile_decode.py: top ops of one prefill and one decode step (bf16, span attention;
#      then int8), torch.profiler.
# Everything goes to "$OUT" (at most 7 files): gpu_round2.log (all output), kernel_tests.log,
# moe_layer.json, decode.json, profile/ (two op tables + the top ops as JSON).
#
#   OUT=/tmp/round2 bash scripts/gpu_round2.sh
#   LAYERS=8 OUT=/tmp/r2 bash scripts/gpu_round2.sh     # fewer decoder layers (quicker, less memory)
#   SMOKE=1 OUT=/tmp/r2 bash scripts/gpu_round2.sh      # plumbing check anywhere: tiny shapes, one test file
#
# Python packages missing or too old on the machine (the package needs transformers >= 5.24) can be
# put as wheels into .whl/ in the repository root; they are installed into /tmp/site first.
# Every step has its own time limit, so one that hangs cannot take the whole run with it.
set -u -o pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to an output folder}"
LAYERS=${LAYERS:-32}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
LOG="$OUT/gpu_round2.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
TESTS=(tests/kernels)
BENCH=(--layers "$LAYERS")
PROF=(--layers "$LAYERS")
if [ "$SMOKE" = 1 ]; then  # tiny shapes; on a machine without CUDA the kernels run in Triton's interpreter
  TESTS=(tests/kernels/test_int8_weights.py)
  BENCH=(--smoke)
  PROF=(--tiny)
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$LOG"

step kernel-tests 140 bash -c 'out=$1; shift; python3 -m pytest -q -p no:cacheprovider "$@" >"$out" 2>&1; rc=$?; tail -n 15 "$out"; exit $rc' \
  _ "$OUT/kernel_tests.log" "${TESTS[@]}"
step moe-layer 70 python3 benchmarks/moe_layer.py $([ "$SMOKE" = 1 ] && echo --smoke) --json "$OUT/moe_layer.json"
step decode 160 python3 benchmarks/decode.py "${BENCH[@]}" --json "$OUT/decode.json"
step profile-bf16 50 python3 benchmarks/profile_decode.py "${PROF[@]}" --attention span --out "$OUT/profile"
step profile-int8 50 python3 benchmarks/profile_decode.py "${PROF[@]}" --attention span --int8 --rows 15
echo "done in $SECONDS s; files in $OUT" | tee -a "$LOG"
