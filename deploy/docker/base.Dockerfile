# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
# recforge base image: NVIDIA's CUDA base, Python 3.11 and the torch build pinned in the CUDA lock; nothing else.
# The app image adds recforge on top, so this layer (the ~4 GB CUDA stack) is rebuilt only when the lock's
# torch pins change.
#   docker buildx build -f deploy/docker/base.Dockerfile -t recforge-base:2.13.0-cu130 .
#
# CUDA_IMAGE is pinned by digest (a tag can be re-pushed under the same name); CI checks the digest exists.
# The "base" flavour (CUDA runtime + the container toolkit's driver hooks) is enough: the torch wheels bring
# their own CUDA, cuDNN and NCCL libraries, which a "runtime"/"cudnn" flavour would ship a second time.
# Its NVIDIA_REQUIRE_CUDA makes `docker run --gpus` refuse a host driver too old for CUDA 13.0, at start.
ARG CUDA_IMAGE=nvidia/cuda:13.0.3-base-ubuntu22.04@sha256:73ab6dfb3814a5097cd456736e70650ef9dc72343be4117d0400de78168760fe
FROM ${CUDA_IMAGE}

ARG CUDA_LOCK=requirements/lock-cu130.txt
ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 22.04's python3.11 (universe); apt versions follow the pinned base image's package snapshot.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 recforge \
    && useradd --system --uid 10001 --gid recforge --create-home --home-dir /home/recforge \
       --shell /usr/sbin/nologin recforge \
    && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3

# torch exactly as the CUDA lock pins it, with its dependencies (CUDA libraries, triton, sympy, ...) held
# to the lock's versions by -c. The import check fails the build if a CPU wheel slipped in.
COPY ${CUDA_LOCK} /opt/recforge/requirements/lock-cuda.txt
RUN pip install --no-cache-dir -c /opt/recforge/requirements/lock-cuda.txt \
        "$(grep -E '^torch(==|===)' /opt/recforge/requirements/lock-cuda.txt)" \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch is a CPU-only build')"

USER 10001:10001
WORKDIR /home/recforge
