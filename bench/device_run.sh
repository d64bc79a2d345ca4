#!/usr/bin/env bash
# One prepared accelerator run: MFU of both train steps in bf16 and GPT sampling throughput.
#   bash bench/device_run.sh 989        # the card's dense bf16 peak in TFLOP/s (H100 SXM: 989; H200: 989)
# Each part prints a table last; a failing part does not stop the others.
set -u
PEAK="${1:?usage: bash bench/device_run.sh PEAK_BF16_TFLOPS}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
python bench/bench_vqgan_step.py --device_mfu --peak_tflops "$PEAK" --batch 16 || echo "stage-one MFU failed"
python bench/bench_gpt_device.py --peak_tflops "$PEAK" --batch 16 || echo "GPT MFU failed"
python bench/bench_gpt_device.py --peak_tflops "$PEAK" --batch 32 --remat || echo "GPT MFU (remat) failed"
