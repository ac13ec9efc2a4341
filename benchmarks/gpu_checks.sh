#!/usr/bin/env bash
# Every accelerator check the open work asks for, in one run that prints the numbers for
# BUILD_NOTES (about 8 minutes on one H100 or H200, compiles included). Run from the repository
# root in an environment with jdl and JAX's CUDA build installed:
#   bash benchmarks/gpu_checks.sh 2>&1 | tee gpu_checks.log
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import jax; print(jax.__version__, jax.devices())"
# GPT-2 small, bfloat16, batch 8 x 1024: tokens/s, FLOPs against 6N + 12LTD, MFU, and whether
# cuDNN's fused attention is in the compiled program.
python -m benchmarks.bench_gpt2 --batch=8 --steps=10
python -m benchmarks.bench_gpt2 --batch=16 --steps=10
# The same with parameters and Adam's state split over every device (FSDP; one device here).
python -m benchmarks.bench_gpt2 --batch=8 --steps=10 --mesh=fsdp
# ResNet-50 at 224 x 224: images/s from device-resident input (the ceiling) and from uint8 host
# batches through the prefetcher, and the MFU.
python -m benchmarks.bench_resnet50 --per_device_batch=128 --steps=20
# The fused (cuDNN) attention against the explicit path, and the chunked loss, on the GPU.
python -m pytest -q -n 0 -p no:cacheprovider tests/transformer_test.py \
  -k "fused_attention or hidden_output or remat or scanned"
