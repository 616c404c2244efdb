# blip2-search: the search API, the indexer and the demo, one image.
# Build:  docker build -t blip2-search .                      # CPU torch (what the demo needs)
# GPU:    docker build --build-arg CUDA=cu124 -t blip2-search:cu124 .
#         CUDA picks torch's wheel index (https://download.pytorch.org/whl/<CUDA>): cpu, cu118, cu121,
#         cu124, cu126, cu128, ... ; the host's NVIDIA driver must support that CUDA version.
#         TORCH_INDEX overrides the whole index URL (a mirror).
FROM python:3.11-slim-bookworm AS build

ARG CUDA=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${CUDA}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first from the chosen wheel index (CPU or CUDA); pip then keeps it when resolving the rest.
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.4,<2.15"
COPY pyproject.toml README.md ./
COPY blip2_embed ./blip2_embed
COPY blip2_search ./blip2_search
COPY blip2_train ./blip2_train
COPY catalog ./catalog
COPY indexer ./indexer
COPY migrations ./migrations
COPY search_api ./search_api
# blip2_search/demo_model (the demo's BLIP-2 pair) is package data: the install puts it in the venv, so
# `blip2-search demo` needs no download or mount; the build fails here if it did not (python -I: the
# installed copy, not ./blip2_search).
RUN pip install . \
 && python -I -c "from blip2_search.demo_model import demo_model_present as ok; raise SystemExit(not ok())"

FROM python:3.11-slim-bookworm
# libgomp: torch/faiss OpenMP; curl: the health check.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libgomp1 curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf \
    BLIP2_DATA_DIR=/data \
    BLIP2_API_HOST=0.0.0.0 \
    BLIP2_API_PORT=8000
# A fixed non-root user; the data volume must be writable by uid 10001.
RUN groupadd --system --gid 10001 blip2 \
 && useradd --system --uid 10001 --gid blip2 --home-dir /data --shell /usr/sbin/nologin blip2 \
 && mkdir -p /data /models /photos && chown -R blip2:blip2 /data /models
USER 10001:10001
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["sh", "-c", "blip2-search db upgrade && exec blip2-search serve"]
