# The pipeline CLI on an official CUDA PyTorch image:
#   docker build -t pipeline .
#   docker run --gpus all --shm-size=8g -v /data:/data pipeline train --shards /data/shards --out /data/runs/r1
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/pipeline
# Metadata first: the dependency layer is rebuilt only when setup.cfg changes.
COPY pyproject.toml setup.cfg README.md ./
COPY model ./model
COPY pipeline ./pipeline
# torch is the image's own CUDA build: setup.cfg's torch>=2.4 is already satisfied, so pip keeps it.
# DL3013 asks to pin what pip installs: "." is this project's own source, pinned by the build itself.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[export]" \
    && pipeline --version

WORKDIR /data
ENTRYPOINT ["pipeline"]
CMD ["--help"]
