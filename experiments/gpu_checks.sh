#!/usr/bin/env bash
# The GPU checks of issues 12-14 in one run (about 8 minutes on one H200), for a machine with a
# CUDA device: the CUDA-only tests, then the early-exit and training-step benchmarks at the
# issues' settings. Results land in experiments/results/*_cuda.{json,md} (or $OUT if set).
#   bash experiments/gpu_checks.sh
# Needs the package's dependencies (pip install -e ".[dev]"); run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_checks_machine.txt"

# CUDA-only tests: engine graph mode = eager = simulation, zero syncs per training step
# (set_sync_debug_mode), both token layouts equal on the GPU.
python -m pytest -q -p no:cacheprovider tests/test_engine_syncs.py tests/test_host_syncs.py \
    tests/test_unmasked_path.py 2>&1 | tee "$out/gpu_checks_tests.txt"

# Issue 13: engine vs plain forward vs timm, ViT-B/16 at 224 px, bf16 autocast.
python experiments/bench_early_exit.py --device cuda --precision bf16 \
    --models vit_base_patch16_224 --img-size 224 --batches 1 64 256 512 \
    --modes eager graphs --layouts streams --repeats 7 --latency-repeats 50 --threads 0 \
    --out "$out/bench_early_exit_cuda"

# Issue 12: training step of each method, ViT-B/16, bf16, compiled and eager.
python experiments/bench_train_step.py --device cuda --precision bf16 \
    --model vit_base_patch16_224 --img 224 --batch 64 --out "$out/bench_train_step_cuda"
