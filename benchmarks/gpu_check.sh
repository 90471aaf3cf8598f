#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with torch and transformers installed, no network): continuous batching
# (benchmarks.generation, greedy mixed lengths, then the prefix cache), the embedder's batching on vs off
# (benchmarks.gpu_serving), then benchmarks/gpu_kd_step.py: tokens/s and peak memory, plain bf16 vs the chunked path
# (± torch.compile). At most ~9 minutes (the timeouts add up to 500 s: one device command may run 600 s, and the
# device session has 15 minutes in all, start included). Each step's whole output is kept in $OUT/<step>.log, so
# what ran survives a step killed by its timeout.
# (The lent machines have torch and transformers but not pydantic, which app.serving and the spec need: it travels
# as wheels in .gpudeps. The job recipe's CUDA branches are exercised on the CPU by the unit tests.)
#
# Prepare here first (PyPI reachable): `.venv/bin/python -m benchmarks.gpu_kit` writes .gpudeps/ (pydantic's wheels
# for the machine's Python 3.12, the 2-layer MiniLM embedder in float16); then run this with carry [".gpudeps"].
set -u -o pipefail  # a step's own exit status, not tail's: a crash or a timeout is reported
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
step() {  # step NAME SECONDS LINES COMMAND...: run it under its timeout, keep its log, show its last lines
  local name=$1 seconds=$2 lines=$3
  shift 3
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log" | tail -"$lines" \
    || echo "$name could not run here (exit ${PIPESTATUS[0]}; 124: its ${seconds} s timeout)"
}
step generation 110 12 python3 -m benchmarks.generation --devices cuda --seconds 5 --max-tokens 8 32 128 \
  --variants bf16 eager
step prefix-cache 75 4 python3 -m benchmarks.generation --devices cuda --modes continuous --shared-prefix 400 \
  --prefix-cache-mb 0 256 --clients 16 --seconds 5 --variants bf16
step gpu-serving 75 7 python3 -m benchmarks.gpu_serving --devices cuda --seconds 5 --variants bf16 eager "${EMBEDDER[@]}"
step kd-step 240 12 python3 -m benchmarks.gpu_kd_step --steps 8 --variants "${VARIANTS:-plain,chunked,chunked-compile}"
