# syntax=docker/dockerfile:1
# Sluice gateway image.
#
#   docker build -t sluice .
#   docker build --build-arg DOWNLOAD_TOKENIZERS=0 -t sluice .   # offline build, no encodings
#
# The tiktoken encodings (o200k_base, cl100k_base) come from the bpe-openai package, a
# dependency, and are copied into /opt/tiktoken at build time without network access;
# TOKENIZERS_SOURCE fetches every file from a mirror instead. The running container never
# fetches anything.
# The image runs as user 10001 and writes nothing outside /tmp: it works with
# readOnlyRootFilesystem (the Helm chart mounts an emptyDir at /tmp).
# The `otel` extra is installed: OTEL_TRACES_EXPORTER=otlp turns tracing on (docs/tracing.md).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the sluice wheel and the wheels of its dependencies -------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY plugins ./plugins
RUN pip wheel --wheel-dir /wheels ".[otel]"

# ---- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG DOWNLOAD_TOKENIZERS=1
ARG TOKENIZERS_SOURCE=""
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
ENTRYPOINT ["sluice"]
CMD ["serve", "--config", "/etc/sluice/config.yaml", "--host", "0.0.0.0"]
