# megatron-averis on an NGC PyTorch image, which ships CUDA, PyTorch, Transformer Engine and apex.
# The project is installed around them: docker/pin_base.py pins the image's GPU stack as pip
# constraints and checks after each install that none of it was replaced.
#
#   docker build -t megatron-averis .
#   docker run --gpus all --ipc=host megatron-averis pretrain --model-preset qwen3-0.6b ...
#
# Transformer Engine >= 2.20 is required (its CustomRecipe runs the Averis recipe in TE's
# layers, --transformer-impl transformer_engine): when the base image ships an older one, TE
# TE_VERSION is built from source against the image's PyTorch and CUDA (about 30 min), and the
# build fails unless transformer_engine with CustomRecipe then imports. Another base:
# --build-arg BASE_IMAGE=<image with PyTorch and the CUDA toolkit>. Usage: docker/README.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG TE_VERSION=2.20.2
ARG TE_MIN_VERSION=2.20
# Hopper and Blackwell; the source build compiles kernels for these only.
ARG NVTE_CUDA_ARCHS="90;100"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    AVERIS_HOME=/workspace/megatron-averis
WORKDIR /workspace/megatron-averis

# Dependencies first, so that this layer is reused while only the sources change. Transformer
# Engine is settled before the GPU stack is pinned: a source build replaces the image's TE.
COPY docker/pin_base.py docker/requirements.txt docker/
RUN if ! python3 docker/pin_base.py has transformer-engine "${TE_MIN_VERSION}"; then \
        NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS}" MAX_JOBS=8 \
        python3 -m pip install --no-cache-dir --no-build-isolation \
            "transformer_engine[pytorch]==${TE_VERSION}"; \
    fi \
    && python3 docker/pin_base.py freeze /opt/averis-base-pins.txt \
    && python3 -m pip install --no-cache-dir -c /opt/averis-base-pins.txt -r docker/requirements.txt \
    && python3 docker/pin_base.py verify /opt/averis-base-pins.txt

COPY . .
# --no-deps: pyproject's torch requirement must not pull a wheel over the image's build. The last
# check fails the build unless transformer_engine >= TE_MIN_VERSION imports with CustomRecipe.
RUN python3 -m pip install --no-cache-dir --no-deps -e . \
    && python3 docker/pin_base.py verify /opt/averis-base-pins.txt \
    && python3 -c "import megatron.core, sentencepiece, megatron_averis.megatron" \
    && python3 -c "from megatron_averis.te.availability import require_te; require_te('the image')" \
    && chmod +x docker/entrypoint.sh

ENTRYPOINT ["/workspace/megatron-averis/docker/entrypoint.sh"]
CMD ["help"]
