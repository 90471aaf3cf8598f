#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with torch and transformers installed, no network). Serving first: it has
# never run on a GPU. (1) The serving issue's text figure over HTTP, as `benchmarks.serving text` measures it on the
# CPU: two `distillery serve` processes (batching on, and off: max_batch_size 1) with the MiniLM-derived embedder on
# the GPU in bf16, wrk at c=32 and c=1 from a second process, against the bare forward (SQLite instead of Postgres,
# which the machine lacks); (2) the same in float32; (3) continuous batching of completions (benchmarks.generation,
# greedy mixed lengths, then the prefix cache); (4) the embedder's batching in-process (benchmarks.gpu_serving); (5)
# only with KD_STEP=1: benchmarks/gpu_kd_step.py (measured on an H100 on 2026-11-27). At most ~8.5 minutes (the
# timeouts add up to 480 s: one device command may run 600 s, and the device session has 15 minutes in all, start
# included). Each step's whole output is kept in $OUT/<step>.log, so what ran survives a step killed by its timeout.
# DEVICE=cpu runs the same steps on a machine without a GPU (a rehearsal: the cuda-only rows are skipped).
#
# Prepare here first (PyPI reachable): `.venv/bin/python -m benchmarks.gpu_kit` writes .gpudeps/ (the wheels the
# lent machine's Python 3.12 lacks: pydantic, fastapi, uvicorn, SQLAlchemy, …; wrk and LuaJIT; the 2-layer MiniLM
# embedder in float16); then run this with carry [".gpudeps"].
set -u -o pipefail  # a step's own exit status, not tail's: a crash or a timeout is reported
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp}"
if [ -d .gpudeps/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpudeps/wheels/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PATH="$PWD/.gpudeps/bin:$PATH" LD_LIBRARY_PATH="$PWD/.gpudeps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEVICE="${DEVICE:-cuda}"
EMBEDDER=()
[ -d .gpudeps/minilm-2 ] && EMBEDDER=(--embedder .gpudeps/minilm-2)
wrk --version 2>&1 | head -1
python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'pydantic', pydantic.VERSION, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc
step() {  # step NAME SECONDS LINES COMMAND...: run it under its timeout, keep its log, show its last lines
  local name=$1 seconds=$2 lines=$3
  shift 3
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log" | tail -"$lines" \
    || echo "$name could not run here (exit ${PIPESTATUS[0]}; 124: its ${seconds} s timeout)"
  # servers a killed benchmark left behind (they run in their own sessions) would hold the GPU for the next steps
  pkill -f "app.cli serve" 2>/dev/null && sleep 1
  return 0
}
step http-bf16 130 16 python3 -m benchmarks.serving text --device "$DEVICE" --variant bf16 --sqlite \
  --seconds 5 --rounds 3 --warmup 8 "${EMBEDDER[@]}"
step http-float32 90 12 python3 -m benchmarks.serving text --device "$DEVICE" --variant eager --sqlite \
  --seconds 4 --rounds 2 --warmup 6 "${EMBEDDER[@]}"
step generation 110 12 python3 -m benchmarks.generation --devices "$DEVICE" --seconds 5 --max-tokens 8 32 128 \
  --variants bf16 eager
step prefix-cache 75 4 python3 -m benchmarks.generation --devices "$DEVICE" --modes continuous --shared-prefix 400 \
  --prefix-cache-mb 0 256 --clients 16 --seconds 5 --variants bf16
step gpu-serving 75 7 python3 -m benchmarks.gpu_serving --devices "$DEVICE" --seconds 5 --variants bf16 eager \
  "${EMBEDDER[@]}"
if [ "${KD_STEP:-0}" = 1 ]; then
  step kd-step 240 12 python3 -m benchmarks.gpu_kd_step --steps 8 --variants "${VARIANTS:-plain,chunked,chunked-compile}"
fi
