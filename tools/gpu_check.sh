#!/usr/bin/env bash
# One call that proves kdfast on a GPU: build for this GPU's architecture, the contract
# suite on cuda, compute-sanitizer memcheck and racecheck over one small call of every CUDA
# and Triton kernel, the quick bench on cuda; then one table (tools/gpu/summary.py).
#
#   tools/gpu_check.sh            on a GPU machine (no network needed; about 8 minutes)
#   tools/gpu_check.sh --dry-run  every stage on this CPU machine: CPU device, Triton under
#                                 the interpreter, the sanitizer skipped with a message
#
# Results land in $OUT (the device tool's folder) or ./gpu-check, at most 8 files (what the
# device tool brings back): gpu_run.json (the contract-suite record, rewritten after every
# test; `python -m tools.gpu.record gpu-check/gpu_run.json` adds a real GPU run to
# kdfast/gpu_results.json, which lifts the opt-in of what passed), bench.json (rewritten
# after every measurement), summary.txt, and logs.tar.gz (a log per stage, refreshed after
# each stage). The whole check keeps within GPU_CHECK_BUDGET seconds (default 540 on a GPU,
# inside the device tool's 10-minute call): each stage runs under the smaller of its own
# limit and the time left after the later stages' shares, so one slow stage cannot eat the
# others' time; a stage's failure is reported and the next stage still runs. KDFAST_COMMIT
# names the commit where the tree is a copy without .git. For a rerun of part of the check:
# GPU_CHECK_CONTRACT (the contract suite's pytest -k expression; default "cuda") and
# GPU_CHECK_BENCH=0 (no bench).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
out=${OUT:-gpu-check}
mkdir -p "$out"
logs=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
started=$(date +%s)
budget=${GPU_CHECK_BUDGET:-$([ $dry_run -eq 1 ] && echo 1800 || echo 540)}

# each stage's RESERVE: the least time the later stages need (info 5 s, contract 45,
# memcheck 20, racecheck 15, bench 60 unless GPU_CHECK_BENCH=0, summary 5)
bench_share=$([ "${GPU_CHECK_BENCH:-1}" = 0 ] && echo 0 || echo 60)
after_racecheck=$((bench_share + 5))
after_memcheck=$((15 + after_racecheck))
after_contract=$((20 + after_memcheck))
after_info=$((45 + after_contract))
after_build=$((5 + after_info))

stage() { printf '\n=== %s (%ss) ===\n' "$1" "$(($(date +%s) - started))"; }
# run LIMIT RESERVE NAME CMD...: CMD under the smaller of LIMIT and the budget left after
# RESERVE seconds kept for the later stages; its output also in the stage's log
run() {
  local limit=$1 reserve=$2 name=$3
  shift 3
  local left=$((started + budget - reserve - $(date +%s)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "!!! $name: not run, the budget of ${budget}s is spent" | tee "$logs/$name.log"
    status=1
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
      echo "!!! $name: exit $rc$([ "$rc" -eq 124 ] && echo " (time limit ${limit}s)")" |
        tee -a "$logs/$name.log"
      status=1
    fi
  fi
  tar -czf "$out/logs.tar.gz" -C "$logs" .
  return 0
}

if [ $dry_run -eq 1 ]; then
  device=cpu
  export TRITON_INTERPRET=1
  # the interpreter is slow: the dry run checks every stage works, on the random samples
  contract_filter=(-k "random")
  bench_suite=--smoke
  # the bench measures what a CPU user runs: the compiled kernels, not the interpreter
  bench_env=(env -u TRITON_INTERPRET)
  bench_limit=600
else
  device=cuda
  contract_filter=(-k "${GPU_CHECK_CONTRACT:-cuda}")
  bench_suite=--quick
  bench_env=(env)
  bench_limit=300
fi

stage "environment"
{
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv
echo "commit ${KDFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}, budget ${budget}s, $(nproc) cores"
$PY - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "absent"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
} 2>&1 | tee "$logs/environment.log"

stage "build"
if [ $dry_run -eq 1 ] && $PY -c "import kdfast._C" 2>/dev/null; then
  echo "dry run: kdfast._C is already built for this torch; not rebuilt"
elif [ $dry_run -eq 1 ]; then
  run 1800 "$after_build" build env KDFAST_NO_CUDA=1 $PY setup.py build_ext --inplace
else
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "building for sm_${arch/./} with $(nproc) jobs"
  run 300 "$after_build" build env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" $PY setup.py build_ext --inplace
fi
run 60 "$after_info" info $PY -m kdfast.info

stage "contract suite on $device"
run 240 "$after_contract" contract $PY -m pytest -q -p no:cacheprovider -p tools.gpu.results \
  --gpu-results "$out/gpu_run.json" --gpu-device "$device" tests/contract "${contract_filter[@]}"

stage "compute-sanitizer: one small call of every CUDA and Triton kernel"
if [ $dry_run -eq 1 ]; then
  echo "dry run: no GPU, compute-sanitizer skipped; the calls it would check run on $device"
  run 300 "$after_racecheck" sanitize-calls $PY -m tools.gpu.sanitize_calls --device "$device"
elif ! command -v compute-sanitizer >/dev/null; then
  echo "!!! compute-sanitizer not found"
  status=1
else
  run 90 "$after_memcheck" sanitizer-memcheck compute-sanitizer --tool memcheck --error-exitcode 3 \
    --target-processes all $PY -m tools.gpu.sanitize_calls --device cuda
  run 60 "$after_racecheck" sanitizer-racecheck compute-sanitizer --tool racecheck --error-exitcode 3 \
    --target-processes all $PY -m tools.gpu.sanitize_calls --device cuda
fi

stage "quick bench on $device"
[ "${GPU_CHECK_BENCH:-1}" = 0 ] && echo "GPU_CHECK_BENCH=0: no bench" ||
run "$bench_limit" 5 bench "${bench_env[@]}" $PY -m kdfast.bench $bench_suite --device "$device" --no-plots \
  --json "$out/bench.json"

stage "summary"
if [ -f "$out/gpu_run.json" ]; then
  $PY -m tools.gpu.summary "$out/gpu_run.json" "$out/bench.json" | tee "$out/summary.txt"
  cp "$out/summary.txt" "$logs/" && tar -czf "$out/logs.tar.gz" -C "$logs" .
else
  echo "!!! the contract suite wrote no results"
  status=1
fi
echo "gpu_check: $([ $status -eq 0 ] && echo ok || echo FAILED) in $(($(date +%s) - started)) s; results in $out/"
exit $status
