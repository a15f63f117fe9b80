#!/usr/bin/env bash
# GPU check: build, run the GPU tests (plain and under compute-sanitizer) and the GPU attention
# benchmark on a GPU machine, recording everything under "${OUT:-/tmp/gpu_out}". The host CPU's
# steps come first (cpu_amx_tests, then cpu_attention_*, cpu_quant_* where it has AMX):
# the GPU machines' Xeons are the only AMX CPUs the project has met.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# The GPU machines are offline and lent briefly, so this is one prepared script: each step's
# output goes to its own file, test failures are recorded (not fatal) so that later steps
# still run, and long steps are bounded with `timeout`. Without a visible GPU it is a dry
# run: the same steps, GPU-only ones skipped with a message, the benchmark with --quick.
# Time limits (seconds) can be overridden: TEST_TIMEOUT, SANITIZER_TIMEOUT, BENCH_TIMEOUT, and
# DEADLINE (whole script, default 3000): each step gets at most what is left of it, and steps
# that would start with under 20 s left are skipped, so the logs are always complete in time.
# SKIP_BUILD=1 reuses the installed build (e.g. a dry run in a tree someone is building).
# STEPS=tests|bench|all|cpu (default all) picks the GPU steps (cpu: none, the host CPU's
# alone); GPU_ARCHS overrides the CUDA archs.
# SKIP_STEPS="name ..." skips those steps; CPU_BENCH=1 times the host CPU's tiers without AMX too.
set -euo pipefail
STEPS="${STEPS:-all}"

OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || PY=python3
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
SANITIZER_TIMEOUT="${SANITIZER_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
DEADLINE="${DEADLINE:-3000}"
STARTED_AT=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the DEADLINE is nearer) with
# output in $OUT/NAME.log; record (don't propagate) its status.
step() {
  local name="$1" limit="$2"; shift 2
  case " ${SKIP_STEPS:-} " in *" $name "*) log "$name: skipped (SKIP_STEPS)"; return 0 ;; esac
  local left=$(( DEADLINE - ($(date +%s) - STARTED_AT) - 10 ))
  if [ "$left" -lt 20 ]; then log "$name: skipped (deadline)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit="$left"
  log "$name (<= ${limit} s): $*"
  local rc=0 t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  log "$name: exit $rc$( [ "$rc" = 124 ] && echo ' (timed out)') after $(( $(date +%s) - t0 )) s"
  return 0
}

# show N FILE: the last N lines of FILE into the summary (a skipped step has no log: not fatal).
show() { tail -n "$1" "$2" 2>/dev/null | tee -a "$SUMMARY" || true; }

# The device tool returns at most 8 files, so everything also goes into one archive, made on
# any exit (a failed build or an error in this script too).
archive() { tar czf /tmp/gpu_check_logs.tgz -C "$OUT" --exclude gpu_check_logs.tgz . 2>/dev/null \
  && mv /tmp/gpu_check_logs.tgz "$OUT/" || true; }
trap archive EXIT

HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L > "$OUT/nvidia-smi-L.txt" 2>&1; then
  HAVE_GPU=1
fi
if [ "$HAVE_GPU" = 1 ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  log "GPU: $(head -n 1 "$OUT/nvidia-smi-L.txt")"
else
  log "no GPU visible (nvidia-smi missing or failing): dry run, GPU-only steps skipped"
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unavailable)"
  git status --short 2>/dev/null | head -n 50 | sed 's/^/  /' || true
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo not found)"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|pybind11|scikit-build-core|cmake|ninja) ' || true
} > "$OUT/versions.txt" 2>&1 || true
log "versions: $(tr '\n' ' ' < "$OUT/versions.txt" | cut -c1-300)"

# Build: a failed build makes every later step meaningless, so it is the one fatal step.
# Only the GPU's own arch is compiled here (GPU_ARCHS, default: read off the device, else 90).
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  log "build: skipped (SKIP_BUILD=1), using the installed llmkernels"
else
  if [ -z "${GPU_ARCHS:-}" ] && [ "$HAVE_GPU" = 1 ]; then
    GPU_ARCHS="$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)"
  fi
  log "build: pip install --no-build-isolation --no-deps -e . (CUDA archs ${GPU_ARCHS:-default})"
  started=$(date +%s)
  if ! CMAKE_ARGS="${GPU_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$GPU_ARCHS}" \
      "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    log "build FAILED: see $OUT/build.log"; tail -n 40 "$OUT/build.log"; exit 1
  fi
  log "build: $(( $(date +%s) - started )) s"
fi
"$PY" -c "import llmkernels, json; print(json.dumps(llmkernels.build_info()))" \
  > "$OUT/build_info.json" 2> "$OUT/build_info.err" || log "build_info FAILED: see $OUT/build_info.err"
log "build_info: $(cut -c1-400 "$OUT/build_info.json" 2>/dev/null)"

# The host CPU first (about a minute): the GPU machines' Xeons have AMX, the amx tier's only hardware
# so far. Without AMX the same tests run the tiles' software model.
HOST_AMX=0
grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null && HOST_AMX=1
log "host CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-) (amx_bf16: $HOST_AMX)"
step cpu_amx_tests "$TEST_TIMEOUT" "$PY" -m pytest tests/test_attention.py tests/test_backends.py \
  tests/test_attention_mask_tiles.py tests/test_attention_dropout.py \
  tests/test_quant_matmul.py tests/test_quant_matmul_many_rows.py -k amx -q -p no:cacheprovider -rfEs
show 3 "$OUT/cpu_amx_tests.log"
if [ "$HOST_AMX" = 1 ] || [ "${CPU_BENCH:-0}" = 1 ]; then
  # Issue 3's targets on two cores of the host (tiers alternate: amx, then avx512_bf16; float32
  # runs the same AVX-512 code on both, so it is timed once).
  for tier in amx avx512_bf16; do
    dtypes=bf16; [ "$tier" = amx ] && dtypes=fp32,bf16
    step "cpu_attention_$tier" "$BENCH_TIMEOUT" env OMP_NUM_THREADS=2 taskset -c 0,1 "$PY" \
      benchmarks/attention.py --device cpu --cpu-tier "$tier" --dtypes "$dtypes" --head-dims 64 \
      --seqlens 2048 --heads 16 --paths ours,sdpa --min-run-time 0.2 --json "$OUT/attention_cpu_$tier.json"
    show 12 "$OUT/cpu_attention_$tier.log"
    # Issue 5's M = 16 / 64 targets (int8 vs int8pack, w8a8 vs dense bf16) on the same cores, and
    # M = 1024 (the amx tier in slabs of 512 rows), 1 and 8 (decoding; int4 at 8 rows: tiles on the
    # amx tier, the int8-activation kernel on avx512_bf16, which is faster there is unmeasured).
    step "cpu_quant_$tier" "$BENCH_TIMEOUT" env OMP_NUM_THREADS=2 LLMKERNELS_CPU_TIER="$tier" \
      taskset -c 0,1 "$PY" benchmarks/quant_matmul.py --device cpu --ms 1,8,16,64,1024 --shapes 4096x4096 \
      --schemes int8,int4,w8a8 --min-run-time 0.2 --json "$OUT/quant_cpu_$tier.json"
    show 20 "$OUT/cpu_quant_$tier.log"
  done
fi

# Two groups, each its own step, so that one timing out keeps the other's results.
GPU_TESTS_ATTENTION="tests/test_attention_gpu.py tests/test_attention_gpu_masks.py tests/test_attention_varlen.py \
  tests/test_attention_kvcache.py tests/test_attention_band.py tests/test_custom_ops_gpu.py"
GPU_TESTS_OTHER="tests/test_quant_matmul_gpu.py tests/test_quant_matmul_triton_kernels.py \
  tests/test_optim.py::test_triton_path_trajectory tests/test_optim_triton_kernels.py tests/test_optim_8bit_triton.py \
  tests/test_optim_sr_triton.py tests/test_optim_cuda.py tests/test_optim_plan.py \
  tests/test_optim_capturable.py tests/test_optim_explain.py tests/test_integration_transformers.py \
  tests/test_func_transforms.py tests/test_jit_trace.py"
# Parallel test processes when pytest-xdist is there: most of the time is Triton compiling.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_PROCS:-8}"
# STEPS=tests or STEPS=bench runs half of the GPU steps (two short calls instead of one long).
if [ "$HAVE_GPU" = 1 ] && { [ "$STEPS" = all ] || [ "$STEPS" = tests ]; }; then
  for group in OTHER ATTENTION; do
    files_var="GPU_TESTS_$group"
    step "gpu_tests_${group,,}" "$TEST_TIMEOUT" env LLMKERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest \
      ${!files_var} -v -p no:cacheprovider $XDIST -rfEs --tb=short \
      --junitxml="$OUT/gpu_tests_${group,,}.xml"
    # One line per finished test (-v), so a step cut by its time limit still names its failures.
    grep -E "(FAILED|ERROR)( |$)" "$OUT/gpu_tests_${group,,}.log" | sort -u | head -n 40 \
      | tee -a "$SUMMARY" || true
    show 3 "$OUT/gpu_tests_${group,,}.log"
  done
  if command -v compute-sanitizer >/dev/null 2>&1; then
    step sanitizer "$SANITIZER_TIMEOUT" compute-sanitizer --tool memcheck \
      --error-exitcode 3 "$PY" -m pytest tests/test_quant_matmul_gpu.py tests/test_attention_gpu.py \
      tests/test_attention_varlen.py tests/test_optim_cuda.py -q -p no:cacheprovider -x \
      -k "cuda and (37-53 or gqa or window or ragged or different or 100 or 17 or 40-192 or dtype1)"
    show 5 "$OUT/sanitizer.log"
  else
    log "compute-sanitizer not found: memcheck skipped"
  fi
fi
if [ "$HAVE_GPU" = 1 ] && { [ "$STEPS" = all ] || [ "$STEPS" = bench ]; }; then
  # Most wanted first (changed since the last GPU run, or never timed on a GPU), so a tight
  # DEADLINE drops the least.
  step optim_bench "$BENCH_TIMEOUT" "$PY" benchmarks/optim.py --device cuda --params 10,50,200 \
    --min-run-time 0.1 --json "$OUT/optim_gpu.json"
  show 22 "$OUT/optim_bench.log"
  # capturable=True steps replayed from a CUDA graph (never run on a GPU yet), its own step.
  step optim_bench_graphs "$BENCH_TIMEOUT" "$PY" benchmarks/optim.py --device cuda \
    --params 10,200 --optimizers adamw,adamw8bit --min-run-time 0.1 --cuda-graphs \
    --json "$OUT/optim_gpu_graphs.json"
  show 12 "$OUT/optim_bench_graphs.log"
  # The CUDA optimizer kernels (served only when forced until timed).
  step optim_bench_cuda "$BENCH_TIMEOUT" env LLMKERNELS_BACKEND=cuda "$PY" benchmarks/optim.py \
    --device cuda --params 10,200 --min-run-time 0.1 --json "$OUT/optim_gpu_cuda.json"
  show 16 "$OUT/optim_bench_cuda.log"
  # Whole models (issue 7's table on a GPU): training step and generation, float vs quantized.
  step model_bench "$BENCH_TIMEOUT" "$PY" benchmarks/model.py --device cuda --preset 100m \
    --families llama --runs 3 --json "$OUT/model_gpu.json" --plot "$OUT/model_gpu.png"
  show 16 "$OUT/model_bench.log"
  for path in triton cuda; do
    # TRITON_PRINT_AUTOTUNING: the log names each shape's chosen tile (for picking defaults).
    # One shape by default: Triton autotunes every (shape, M), and two shapes took over 60 s.
    step "quant_bench_$path" "$BENCH_TIMEOUT" env TRITON_PRINT_AUTOTUNING=1 "$PY" \
      benchmarks/quant_matmul.py --device cuda \
      --backend "$path" --ms 1,16,4096 --shapes "${QUANT_SHAPES:-4096x11008}" --min-run-time 0.1 \
      --json "$OUT/quant_gpu_$path.json"
    show 16 "$OUT/quant_bench_$path.log"
  done
  # Training through quantized layers: d x of QuantLinear (sliced dequantization on the GPU)
  # against nn.Linear with a frozen weight.
  step quant_backward_bench "$BENCH_TIMEOUT" "$PY" benchmarks/quant_matmul_backward.py \
    --device cuda --ms 16,4096 --shape 4096x4096 --min-run-time 0.1 \
    --json "$OUT/quant_backward_gpu.json"
  show 10 "$OUT/quant_backward_bench.log"
  # The one-row Triton GEMV (opt-in until timed; compare its graph times with the decode
  # variant's above, then make the faster one the default for M = 1).
  step quant_bench_triton_gemv "$BENCH_TIMEOUT" env TRITON_PRINT_AUTOTUNING=1 "$PY" \
    benchmarks/quant_matmul.py --device cuda --backend triton --triton-variant gemv --ms 1 \
    --schemes int8,int4 --shapes "${QUANT_SHAPES:-4096x11008}" --min-run-time 0.1 \
    --json "$OUT/quant_gpu_triton_gemv.json"
  show 8 "$OUT/quant_bench_triton_gemv.log"
  # Why the one-row kernels are slower than bf16 cuBLAS (CUDA GEMV int4 0.71x on the H200):
  # occupancy, memory throughput and warp stalls from the hardware counters, where ncu reads
  # them (Firecracker machines; not gVisor).
  if command -v ncu >/dev/null; then
    step ncu_quant_gemv "$BENCH_TIMEOUT" env LLMKERNELS_TRITON_AUTOTUNE=0 ncu --clock-control none \
      --kernel-name regex:"gemv|gemm_kernel|combine" --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats "$PY" benchmarks/quant_gemv_profile.py
    show 40 "$OUT/ncu_quant_gemv.log"
  else
    log "ncu_quant_gemv: skipped (no ncu on PATH)"
  fi
  step attention_bench_triton "$BENCH_TIMEOUT" "$PY" benchmarks/attention.py --device cuda \
    --ours-backend triton --paths ours,sdpa --dtypes bf16 --head-dims 128 --seqlens "${BENCH_SEQLENS:-4096}" \
    --batch "${BENCH_BATCH:-4}" --heads "${BENCH_HEADS:-16}" --min-run-time 0.1 --json "$OUT/attention_gpu_triton.json"
  show 12 "$OUT/attention_bench_triton.log"
  step decode_bench_triton "$BENCH_TIMEOUT" "$PY" benchmarks/attention_decode.py --device cuda \
    --ours-backend triton --batch 1,8 --cache-lens 8192 --min-run-time 0.1 --json "$OUT/decode_gpu_triton.json"
  show 6 "$OUT/decode_bench_triton.log"
  step decode_bench_triton_ragged "$BENCH_TIMEOUT" "$PY" benchmarks/attention_decode.py --device cuda \
    --ours-backend triton --batch 8 --cache-lens 8192 --ragged --min-run-time 0.1 \
    --json "$OUT/decode_gpu_triton_ragged.json"
  show 5 "$OUT/decode_bench_triton_ragged.log"
  # Masks of padded / packed batches and windows: Triton (the CUDA path leaves masks to it).
  step masked_bench "$BENCH_TIMEOUT" "$PY" benchmarks/attention_masked.py --device cuda \
    --seqlens 2048 --batch 4 --heads 16 --head-dim 128 --min-run-time 0.1 \
    --json "$OUT/attention_masked_gpu.json"
  show 12 "$OUT/masked_bench.log"
  # The CUDA attention kernels are untuned (0.07-0.1x SDPA on an H100): timed last.
  step attention_bench_cuda "$BENCH_TIMEOUT" "$PY" benchmarks/attention.py --device cuda \
    --ours-backend cuda --paths ours,sdpa --dtypes bf16 --head-dims 128 --seqlens "${BENCH_SEQLENS:-4096}" \
    --batch "${BENCH_BATCH:-4}" --heads "${BENCH_HEADS:-16}" --min-run-time 0.1 --json "$OUT/attention_gpu_cuda.json"
  show 12 "$OUT/attention_bench_cuda.log"
fi
if [ "$HAVE_GPU" = 0 ]; then
  log "gpu_tests, sanitizer: skipped (no GPU); GPU test files run on the CPU (Triton interpreted)"
  step gpu_tests_interpreted "$TEST_TIMEOUT" "$PY" -m pytest $GPU_TESTS_OTHER $GPU_TESTS_ATTENTION \
    -q -p no:cacheprovider
  show 3 "$OUT/gpu_tests_interpreted.log"
  step attention_bench "$BENCH_TIMEOUT" "$PY" benchmarks/attention.py --device cpu \
    --quick --json "$OUT/attention_cpu_quick.json"
  show 12 "$OUT/attention_bench.log"
  step decode_bench "$BENCH_TIMEOUT" "$PY" benchmarks/attention_decode.py --device cpu \
    --batch 1 --cache-lens 512 --min-run-time 0.02
  show 4 "$OUT/decode_bench.log"
  step masked_bench "$BENCH_TIMEOUT" "$PY" benchmarks/attention_masked.py --device cpu \
    --seqlens 128 --batch 2 --heads 2 --head-dim 32 --packed-len 40 --window 32 --min-run-time 0.02
  show 10 "$OUT/masked_bench.log"
  step quant_bench "$BENCH_TIMEOUT" "$PY" benchmarks/quant_matmul.py --device cpu --quick
  show 10 "$OUT/quant_bench.log"
  step quant_backward_bench "$BENCH_TIMEOUT" "$PY" benchmarks/quant_matmul_backward.py \
    --device cpu --ms 1,16 --shape 1024x1024 --min-run-time 0.05
  show 8 "$OUT/quant_backward_bench.log"
  step optim_bench "$BENCH_TIMEOUT" "$PY" benchmarks/optim.py --quick
  show 10 "$OUT/optim_bench.log"
fi
log "done: results in $OUT"
