# syntax=docker/dockerfile:1
# Sluice gateway image.
#
#   docker build -t sluice .
#   docker build --build-arg DOWNLOAD_TOKENIZERS=0 -t sluice .   # no encodings: estimated counts
#
# Where Docker Hub is reached through a mirror (a pull-through cache or an internal registry),
# name the same base image there, ideally by digest:
#
#   docker build --build-arg PYTHON_IMAGE=registry.example.com/dockerhub/library/python:3.11.14-slim-bookworm .
#   docker build --build-arg PYTHON_IMAGE=registry.example.com/library/python@sha256:<digest> .
#
# and a PyPI mirror with --build-arg PIP_INDEX_URL=https://pypi.example.com/simple.
#
# Reproducible: the base image is pinned to a patch release, and every Python dependency is
# pinned by constraints.txt (regenerate it with tools/update-constraints.sh).
#
# The tiktoken encodings (o200k_base, cl100k_base) come from the bpe-openai package, a
# dependency, and are copied into /opt/tiktoken at build time without network access;
# TOKENIZERS_SOURCE fetches every file from a mirror instead. The running container never
# fetches anything.
# The image runs as user 10001 and writes nothing outside /tmp: it works with
# readOnlyRootFilesystem (the Helm chart mounts an emptyDir at /tmp).
# The `otel` extra is installed: OTEL_TRACES_EXPORTER=otlp turns tracing on (docs/tracing.md).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: the sluice wheel and the wheels of its dependencies -------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG PIP_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
COPY plugins ./plugins
RUN PIP_INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}" \
    pip wheel --wheel-dir /wheels --constraint constraints.txt ".[otel]"

# ---- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG DOWNLOAD_TOKENIZERS=1
ARG TOKENIZERS_SOURCE=""
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="A streaming gateway for LLM traffic: re-streams SSE chunk by chunk through a plugin chain." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/sluice/sluice" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    TMPDIR=/tmp \
    HOME=/tmp

RUN groupadd --gid 10001 sluice \
    && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin sluice

# Only wheels built above: no compiler or source tree in this stage.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "sluice[otel]"

RUN mkdir -p /opt/tiktoken /etc/sluice \
    && if [ "$DOWNLOAD_TOKENIZERS" = "1" ]; then \
         sluice tokenizers download /opt/tiktoken ${TOKENIZERS_SOURCE:+--source "$TOKENIZERS_SOURCE"} \
         && sluice tokenizers status /opt/tiktoken; \
       else \
         echo "skipping the tiktoken encodings: token counts fall back to estimates"; \
       fi \
    && chmod -R a+rX /opt/tiktoken

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# For plain `docker run` (Kubernetes uses the chart's probes instead): GET /readyz on the
# config's port (8080 unless changed: then override with --health-cmd). No curl in a slim image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"]
ENTRYPOINT ["sluice"]
CMD ["serve", "--config", "/etc/sluice/config.yaml", "--host", "0.0.0.0"]
