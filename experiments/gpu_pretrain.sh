#!/usr/bin/env bash
# Issue 21, item 3 on a GPU: continue the shipped demo backbone on fresh glyphs, fractals and
# contours (no real image), with each epoch's images made by CPU processes. 30 epochs are an
# estimate of ~6 minutes on one H200 with 16 CPU cores (never measured: time EPOCHS=1 first). Writes
# $OUT/pretrain_gpu.{safetensors,json,log} (default OUT: experiments/results).
#   bash experiments/gpu_pretrain.sh                        # on the GPU machine
#   DEVICE=cpu EPOCHS=1 TRAIN_SIZE=512 WORKERS=2 bash experiments/gpu_pretrain.sh   # smoke test
# Then, on a machine with the Fashion-MNIST package, the 1k table with that backbone:
#   python experiments/run_fashion_mnist.py --extra backbone.weights_file=$OUT/pretrain_gpu.safetensors \
#       --out outputs/fmnist_gpu_backbone --name fashion_mnist_1k_gpu_backbone_cpu
# Needs the package's dependencies (pip install -e .); run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results}"
mkdir -p "$out"
python -m met_lightning.demo.pretrain --device "${DEVICE:-cuda}" \
    --data-workers "${WORKERS:-$(($(nproc) - 2))}" --threads 2 \
    --epochs "${EPOCHS:-30}" --train-size "${TRAIN_SIZE:-90000}" --formula-share 0.5 --seed 2 \
    --init met_lightning/assets/demo_vit_glyphs.safetensors \
    --out "$out/pretrain_gpu.safetensors" 2>&1 | tee "$out/pretrain_gpu.log"
