#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with torch and transformers installed, no network): continuous batching
# (benchmarks.generation, greedy mixed lengths, then the prefix cache), the embedder's batching on vs off
# (benchmarks.gpu_serving), then benchmarks/gpu_kd_step.py: tokens/s and peak memory, plain bf16 vs the chunked path
# (± torch.compile). About 11 minutes at most (the timeouts); the device session has 15 in all, start included.
# (The lent machines have torch and transformers but not pydantic, which app.serving and the spec need: it travels
# as wheels in .gpudeps. The job recipe's CUDA branches are exercised on the CPU by the unit tests.)
#
# Prepare here first (PyPI reachable): `.venv/bin/python -m benchmarks.gpu_kit` writes .gpudeps/ (pydantic's wheels
# for the machine's Python 3.12, the 2-layer MiniLM embedder in float16); then run this with carry [".gpudeps"].
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp}"
if [ -d .gpudeps/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpudeps/wheels/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
EMBEDDER=()
[ -d .gpudeps/minilm-2 ] && EMBEDDER=(--embedder .gpudeps/minilm-2)
python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'pydantic', pydantic.VERSION, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Serving first: never run on a GPU yet (the KD step below was measured on an H100 on 2026-11-27).
timeout 150 python3 -m benchmarks.generation --devices cuda --seconds 5 --max-tokens 8 32 128 --variants bf16 eager \
  2>&1 | tail -12 \
  || echo "benchmarks.generation could not run here"
timeout 100 python3 -m benchmarks.generation --devices cuda --modes continuous --shared-prefix 400 \
  --prefix-cache-mb 0 256 --clients 16 --seconds 5 --variants bf16 2>&1 | tail -4 || echo "prefix caching could not run here"
timeout 100 python3 -m benchmarks.gpu_serving --devices cuda --seconds 5 --variants bf16 eager "${EMBEDDER[@]}" \
  2>&1 | tail -7 \
  || echo "benchmarks.gpu_serving could not run here"
timeout 300 python3 -m benchmarks.gpu_kd_step --steps 8 --variants ${VARIANTS:-plain,chunked,chunked-compile} 2>&1 \
  | tail -12
