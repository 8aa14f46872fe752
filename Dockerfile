# The pipeline CLI on an official CUDA PyTorch image:
#   docker build -t pipeline .
#   docker run --rm --gpus all --shm-size=8g -v /data:/data pipeline train --shards /data/shards --out /data/runs/r1
# The base ships Python 3.11 (conda, /opt/conda) on Ubuntu 22.04 and torch 2.6.0+cu124:
# setup.cfg asks python_requires >=3.11 and torch>=2.5; the first RUN below checks both.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

# LOGNAME: `docker run --user "$(id -u):$(id -g)"` runs as a uid the image has no name for, and
# this torch (2.6) names its compile cache by getpass.getuser(), which then raises KeyError
# (`--compile`: "uid not found"; fixed in torch 2.13): getuser() reads LOGNAME first.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOGNAME=pipeline

# tini as PID 1: it forwards signals (docker stop, Ctrl-C) and reaps orphaned processes, such as
# loader workers or a `pipe:` shard's command whose parent died. A user to run as: not root.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group pipeline \
    && install -d -o pipeline -g pipeline /data \
    && python -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); assert sys.version_info >= (3, 11) and v >= (2, 5), (sys.version, torch.__version__)"

WORKDIR /opt/pipeline
# The dependencies first, in their own layer, pinned to the versions tested (torch excluded:
# the image's own CUDA build stays): a change to the sources does not reinstall them.
COPY docker/constraints.txt docker/constraints.txt
RUN pip install --no-cache-dir -r docker/constraints.txt

# Then the package itself; its dependencies are already there, at the pinned versions.
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY model ./model
COPY pipeline ./pipeline
# DL3013 asks to pin what pip installs: "." is this project's own source, and -c pins the rest.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c docker/constraints.txt ".[export]" \
    && pipeline --version

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["/usr/bin/tini", "--", "pipeline"]
CMD ["--help"]
