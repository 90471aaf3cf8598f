#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with torch and transformers installed, no network):
# benchmarks/gpu_kd_step.py: tokens/s and peak memory, plain bf16 vs the chunked path (± torch.compile).
# (The lent machines have torch and transformers but not pydantic, so the service's spec-driven recipe itself
# cannot be imported there; its CUDA branches are exercised on the CPU by the unit tests.)
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 420 python -m benchmarks.gpu_kd_step --steps 8 --variants ${VARIANTS:-plain,chunked,chunked-compile} 2>&1 | tail -12
# Serving on the GPU (each needs app.serving importable there: pydantic and friends, if the machine has them).
timeout 180 python -m benchmarks.generation --devices cuda --seconds 5 --max-tokens 8 32 128 2>&1 | tail -8 \
  || echo "benchmarks.generation could not run here"
timeout 120 python -m benchmarks.generation --devices cuda --modes continuous --shared-prefix 400 \
  --prefix-cache-mb 0 256 --clients 16 --seconds 5 2>&1 | tail -4 || echo "prefix caching could not run here"
timeout 120 python -m benchmarks.gpu_serving --devices cuda --seconds 5 2>&1 | tail -6 \
  || echo "benchmarks.gpu_serving could not run here"
