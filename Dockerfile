# megatron-averis on an NGC PyTorch image, which ships CUDA, PyTorch, Transformer Engine and apex.
# The project is installed around them: docker/pin_base.py pins the image's GPU stack as pip
# constraints and checks after each install that none of it was replaced.
#
#   docker build -t megatron-averis .
#   docker run --gpus all --ipc=host megatron-averis pretrain --model-preset qwen3-0.6b ...
#
# Another base: --build-arg BASE_IMAGE=<image with PyTorch>. Usage: docker/README.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    AVERIS_HOME=/workspace/megatron-averis
WORKDIR /workspace/megatron-averis

# Dependencies first, so that this layer is reused while only the sources change.
COPY docker/pin_base.py docker/requirements.txt docker/
RUN python3 docker/pin_base.py freeze /opt/averis-base-pins.txt \
    && python3 -m pip install --no-cache-dir -c /opt/averis-base-pins.txt -r docker/requirements.txt \
    && python3 docker/pin_base.py verify /opt/averis-base-pins.txt

COPY . .
# --no-deps: pyproject's torch requirement must not pull a wheel over the image's build.
RUN python3 -m pip install --no-cache-dir --no-deps -e . \
    && python3 docker/pin_base.py verify /opt/averis-base-pins.txt \
    && python3 -c "import megatron.core, sentencepiece, megatron_averis.megatron" \
    && chmod +x docker/entrypoint.sh

ENTRYPOINT ["/workspace/megatron-averis/docker/entrypoint.sh"]
CMD ["help"]
