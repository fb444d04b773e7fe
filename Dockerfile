# syntax=docker/dockerfile:1
#
# ProlifScore image. Layout: ONE image with per-service commands
# (prolifscore-tiling, prolifscore-filtering, prolifscore-scoring, prolifscore-modelserver,
# prolifscore train ...), not one image per service. Why: every service imports the same library
# (prolifscore.core: OpenSlide, Ray, TensorFlow protos, Kafka) and >95% of the bytes are the shared
# dependencies; the KubeRay head/worker pods must run the *same* Python, Ray and prolifscore code as
# the services that connect to them with Ray Client (a version mismatch is a hard error), so one
# image guarantees it; one build, one scan, one pull per node.
#
# Targets:
#   runtime (default)  CPU image for the services, the Ray cluster and CPU training
#   gpu                same, plus TensorFlow's CUDA wheels (tensorflow[and-cuda]) for GPU training
# TF Serving is not built here: it runs the upstream tensorflow/serving:<version> image
# (tensorflow/serving:<version>-gpu on GPU nodes).
#
#   docker build -t registry.example.com/prolifscore/prolifscore:0.1.0 .
#   docker build --target gpu -t registry.example.com/prolifscore/prolifscore-gpu:0.1.0 .
#
# The final stages hold only the runtime virtualenv (requirements/base.in pinned by
# requirements/lock.txt, no pytest/ruff) and run as the non-root user 10001. Nothing is written to
# the image's file system at run time: HOME and TMPDIR point at /tmp, which Kubernetes mounts as an
# emptyDir (readOnlyRootFilesystem: true), and data lives on mounted volumes.
#
# Pin the base by digest in CI (python:3.11.13-slim-bookworm@sha256:...): digests cannot be
# resolved on the offline build machines, so the exact tag is the pin here.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements/ requirements/
# Runtime dependencies only: base.in, every version pinned by lock.txt (used as constraints, so the
# dev tools in the lock are not installed). ray[default] adds the dashboard and its agent, which
# KubeRay needs (RayJob submission, health endpoints); its extra packages are not in lock.txt yet
# and resolve at build time (see README, Kubernetes).
RUN pip install -c requirements/lock.txt -r requirements/base.in "ray[default]==2.60.0"
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
# The viewer's JavaScript (OpenSeadragon) from the npm registry, pinned by its lock file; only
# the build stage has npm, the installed files travel in the package.
RUN apt-get update && apt-get install -y --no-install-recommends npm \
    && rm -rf /var/lib/apt/lists/* \
    && cd services/prolifscore/viewer/web && npm ci --no-audit --no-fund --omit=dev
# Generated protobuf code (git-ignored) becomes prolifscore.v1, as `make protos` does.
RUN rm -rf services/prolifscore/v1 \
    && python -m grpc_tools.protoc -Iprotos --python_out=services --pyi_out=services \
       --grpc_python_out=services protos/prolifscore/v1/*.proto \
    && touch services/prolifscore/v1/__init__.py \
    && pip install --no-deps . \
    && prolifscore config > /dev/null

# GPU training: TensorFlow's CUDA/cuDNN wheels on top of the same environment.
FROM builder AS builder-gpu
RUN pip install -c requirements/lock.txt "tensorflow[and-cuda]==2.21.0"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
LABEL org.opencontainers.image.title="prolifscore" \
      org.opencontainers.image.description="TUPAC16 proliferation scoring services (tiling, filtering, scoring, training)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 prolif \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin prolif
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp
USER 10001:10001
CMD ["prolifscore", "--help"]

FROM runtime-base AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv

# Default target (last stage): the CPU image.
FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
