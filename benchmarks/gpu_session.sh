#!/usr/bin/env bash
# One device call for a GPU session (the lease is ~15 min, a call at most 10): the checks and
# figures issues 11, 12 and 14 still wait for, most important first, each under its own time
# limit so that the call ends by ~560 s whatever happens. Everything lands under $OUT, in at most
# 8 files (what a device call brings back):
#   summary.txt          GPU, versions, and each step's exit status and end time
#   tests.log            the CUDA-only tests (those that skip on a CPU), then test_triton_decode.py
#                        and test_triton.py natively (no autotuning) for the rest of the step's time
#   gpu_flex.json/.log   issue 11: qkv's flex backend against FlexAttention called directly
#   decode_twin_cuda.*   issue 14: eager and CUDA-graph tokens/s at batch 1 and 16 (JSON per batch)
#   gpu_attention.*      issue 12: the Triton kernels against SDPA and Flex (what time is left;
#                        a second call: python3 benchmarks/gpu_attention.py --budget-s 450)
# Run from the repository root:  bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT
start=$(date +%s)
left() { echo $((560 - ($(date +%s) - start))); }
step() {  # step NAME SECONDS COMMAND...: run with a limit (never past the call's end), log to $OUT/NAME.log
  # (skipped under 40 s: importing torch, starting CUDA and a first compile take about that)
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  if [ "$limit" -lt 40 ]; then echo "== $name: no time left (${limit}s)" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
}
timeout 20 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$OUT/summary.txt" 2>&1
timeout 60 python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/summary.txt" 2>&1

# The CUDA-only tests first (-k: their names say cuda/gpu), quickest first (test_flex's compile
# Flex forward+backward for 6 kinds, gpu_flex.py's correctness checks again); test_triton.py
# natively compiles over a hundred kernel variants (2-4 s each) and may not finish in the time
# left, so it comes last (-v: each result is logged as it comes, so a run cut short still says
# which passed).
cuda_only="cuda or gpu or data_device"
step tests 150 env QKV_TRITON_AUTOTUNE=0 bash -c "python3 -m pytest -v -rfEs -p no:cacheprovider -k '$cuda_only' \
  tests/test_triton_gpu.py tests/test_promises.py tests/test_cache_common.py tests/test_layout.py \
  tests/test_positions.py tests/test_decode_fast.py tests/test_flex.py; \
  python3 -m pytest -v -rfEs -p no:cacheprovider tests/test_triton_decode.py tests/test_triton.py"
step gpu_flex 240 env CHECK_S=220 python3 benchmarks/gpu_flex.py
step decode_twin_cuda 150 python3 benchmarks/decode_speed.py twin --device cuda --batches 1 16 --rounds 3 \
  --out "$OUT/decode_twin_cuda.json"
# Its own budget from the time left (it starts no row that would not end by then).
ga_budget=$(( $(left) - 30 )); [ "$ga_budget" -gt 170 ] && ga_budget=170
step gpu_attention 200 python3 benchmarks/gpu_attention.py --budget-s "$ga_budget"

grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 4
cat "$OUT/summary.txt"
