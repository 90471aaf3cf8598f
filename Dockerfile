# syntax=docker/dockerfile:1
# One image for every process type: `distillery api | worker | migrate | up`.
#   docker build -t distillery .
#   docker build --build-arg TORCH_INDEX=<PyTorch's CPU wheel index URL> -t distillery .        (smallest CPU image)
#   docker build --build-arg TORCH_INDEX=<PyTorch's CUDA wheel index URL> -t distillery:cuda .  (GPU workers)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
ARG TORCH_SPEC="torch==2.13.0"
# empty: the default index. On x86_64 Linux its torch wheel carries CUDA (GBs); point TORCH_INDEX at PyTorch's CPU
# wheel index for a small CPU-only image.
ARG TORCH_INDEX=""
RUN python -m venv /opt/venv
RUN if [ -n "$TORCH_INDEX" ]; then /opt/venv/bin/pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else /opt/venv/bin/pip install "$TORCH_SPEC"; fi
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY worker /src/worker
COPY migrations /src/migrations
RUN /opt/venv/bin/pip install /src && find /opt/venv -name "__pycache__" -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin distillery \
    && mkdir -p /data && chown distillery:distillery /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DISTILLERY_DATA_DIR=/data \
    DISTILLERY_HOST=0.0.0.0 \
    DISTILLERY_PORT=8000 \
    HF_HUB_OFFLINE=1
USER distillery
WORKDIR /home/distillery
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["distillery"]
CMD ["api"]
