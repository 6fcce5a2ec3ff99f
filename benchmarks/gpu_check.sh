#!/usr/bin/env bash
# One prepared run for a GPU machine with torch and triton preinstalled and no network (the `device` tool lends one
# for ~15 minutes): install spdf offline, run the GPU benchmarks, then the tests that behave differently on a GPU. Each
# part has its own time limit so one slow part cannot eat the rest; all of it fits in 8 minutes on an H100/H200.
# Results go to benchmarks/results/gpu/ (commit them); with $OUT set (the device tool), they are also packed into
# $OUT/gpu_results.tgz, since that tool hands back at most 8 files.
#
#   bash benchmarks/gpu_wheels.sh        # first, where pip reaches the registry: .whl/ (carry it to the GPU machine)
#   bash benchmarks/gpu_check.sh         # on the GPU machine, from anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
res=benchmarks/results/gpu
mkdir -p "$res"
summary="$res/summary.md"
started=$(date +%s)

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to $res/NAME.log, one line in the summary
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$res/$name.log" 2>&1
  rc=$?
  local verdict=ok
  [ "$rc" -eq 0 ] || verdict="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
  echo "| $name | $verdict | $(( $(date +%s) - t0 )) s | ${limit} s | $(tail -n 1 "$res/$name.log" | tr '|' '/') |" \
    | tee -a "$summary"
}

{
  echo "# gpu_check.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
  '| cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
  echo '```'
  echo
  echo "| part | verdict | took | limit | last line of its log |"
  echo "|---|---|---|---|---|"
} >"$summary"

# 1. spdf itself (offline: PEP 660 editable install with the machine's setuptools) and the carried [dev] wheels;
#    a string for bash -c, since `timeout` runs programs, not shell functions
install_spdf='
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl || exit
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
    python3 -c "import spdf, spdf.kernels; print(\"spdf from\", spdf.__file__)"'
part install 40 bash -c "$install_spdf"
# 2. the GPU benchmarks first, the figures issue 20 waits for: whole training steps per backend at GPT-3 XL width
#    (dense, masked, compressed, block-128, 2:4), the kernels on a reduced grid, then the fast patterns at XL fc1
#    (block-64/128 by every implementation: spdf's block and tile kernels, tuned torch BSR, stk; 2:4), whose files are
#    rewritten after every case. With time left on the device, `kernel_speed.py --out benchmarks/results` (full grid,
#    patterns included) writes the committed kernels.{json,md,png}.
part gpu_step 100 python3 benchmarks/gpu_step.py --steps 8 --warmup 3 --out "$res"
part kernel_speed 50 python3 benchmarks/kernel_speed.py --quick --no-patterns --out "$res"
part pattern_speed 70 python3 benchmarks/pattern_speed.py --quick --out "$res"
# 3. the tests that behave differently on a GPU: every file with CUDA tests (compiled Triton kernels: the interpreter
#    is chosen only without CUDA; the block and 2:4 backends; FSDP2 on one GPU; generation on CUDA), and tiny `spdf
#    run`s, which accelerate places on the GPU (masked, compressed and block backends). The whole suite (~8 min
#    serially on 2 CPU cores) does not fit in this script's 8 minutes: it needs a device session of its own
#    (`python -m pytest -q -p no:cacheprovider`). -p no:cacheprovider keeps the checkout clean.
gpu_tests=(tests/kernels/test_cuda.py tests/kernels/test_block_cuda.py tests/kernels/test_torch_sparse_peer.py
           tests/sparsity/test_semi_structured.py tests/sparsity/test_block_backend.py tests/eval/test_generate.py
           tests/benchmarks/test_pattern_speed.py tests/train/test_user_errors.py tests/train/test_run.py
           tests/train/test_block_run.py tests/train/test_compressed_run.py)
part gpu_tests 210 python3 -m pytest -q -p no:cacheprovider "${gpu_tests[@]}"

echo "" >>"$summary"
echo "whole run: $(( $(date +%s) - started )) s" | tee -a "$summary"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_results.tgz" "$res" && cp "$summary" "$OUT/summary.md"
fi
