#!/usr/bin/env bash
# One prepared run for a lent GPU machine (e.g. the `device` tool): the CUDA tests, then the GPU benchmarks, results
# into benchmarks/results/ (or $OUT when set, for machines that hand back only one folder). About 10 minutes on an
# H100/H200; each step has its own time limit so one slow part cannot eat the rest.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
# compiled Triton on CUDA tensors: the interpreter must be off for this file
TRITON_INTERPRET=0 timeout 240 python -m pytest -q tests/kernels/test_cuda.py 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
timeout 300 python benchmarks/kernels.py --out "$out" 2>&1 | tail -25
timeout 180 python benchmarks/step_overhead.py --device cuda --d-model 2048 --layers 8 --batch 8 --seq 1024 \
  --reps 30 --out "$out" 2>&1 | tail -12
