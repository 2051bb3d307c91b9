# The QLoRA job's image: the same image runs on SageMaker (`<image> train`), on a Kubernetes GPU node and
# under `docker run --gpus all`.
#   docker build -t qlora-job .
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest> -t qlora-job .   # pinned base
# CUDA comes from PyTorch's CUDA 12.8 wheels (the CUDA user-space libraries are wheels in the lock file); the
# host's NVIDIA driver, 525.60.13 or newer, is mounted in by the NVIDIA container toolkit. Why this base, the
# driver floor, the image size and the `docker run` recipes: container/README.md.

# Any Debian 12 (bookworm) root file system: its python3 is the CPython 3.11 the lock file is resolved for.
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- build: a virtual environment from the lock
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# An ARG, not an ENV: apt's prompts are off during the build and the setting does not reach the image.
ARG DEBIAN_FRONTEND=noninteractive
# Debian package versions are not pinned: the archive drops superseded versions (security updates), so
# exact pins stop building; the pinned base image and the hashed lock file make the build repeatable.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
COPY container/requirements.lock /tmp/requirements.lock
# Every package pinned and hashed, wheels only: nothing is compiled here, so this stage has no compiler.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        --only-binary=:all: -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY entrypoints /src/entrypoints
# The project itself: no dependency resolution and no index (everything came from the lock above), and
# `pip check` proves the lock is complete and consistent.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --no-index /src \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="QLoRA fine-tuning job for Llama-class models: S3 in, TRL SFT with W&B, merged model out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3: the interpreter the venv links to. tini: PID 1 that forwards SIGTERM to the job and reaps
# torchrun's children. setpriv (util-linux, already in every Debian base) drops root for the entrypoint.
# gcc, libc6-dev and libpython3.11-dev (~205 MB installed): Triton, behind torch.compile and Liger's kernels,
# builds a small C launcher (a Python extension) on first use and caches it under TRITON_CACHE_DIR; without a C
# compiler neither runs (docs/PERF.md: compiled layers were up to 30% faster). No pip cache, no apt lists.
# uid 1000 `app` runs the job; /opt/ml is its to write.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini ca-certificates gcc libc6-dev libpython3.11-dev \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && install -d -o 1000 -g 1000 /opt/ml /opt/ml/model /opt/ml/output /opt/ml/checkpoints /opt/ml/work \
    && install -d /opt/ml/input/data /opt/ml/input/config
COPY --from=build /opt/venv /opt/venv
COPY container/entrypoint.py /opt/app/container/entrypoint.py
# Every cache and config a library writes lives below /tmp or /opt/ml/work, so the image also runs with a
# read-only root file system (Kubernetes mounts emptyDir volumes at /tmp and /opt/ml). The model download
# cache goes to /opt/ml/work: on SageMaker that is the large ML storage volume, /tmp is the small root disk.
# NVIDIA_*: what the NVIDIA container toolkit mounts in (the driver's CUDA and NVML libraries, nvidia-smi);
# `--gpus` and the Kubernetes device plugin narrow the devices per container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/opt/ml/work/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    WANDB_DIR=/opt/ml/work \
    WANDB_DATA_DIR=/opt/ml/work/wandb-data \
    WANDB_CACHE_DIR=/tmp/cache/wandb \
    WANDB_CONFIG_DIR=/tmp/config/wandb \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/torchinductor \
    CUDA_CACHE_PATH=/tmp/cache/nv \
    MPLCONFIGDIR=/tmp/config/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
# No USER instruction on purpose: SageMaker mounts /opt/ml root-owned and starts the image as its USER, so
# the entrypoint starts as root there, hands /opt/ml to uid 1000 and drops to it before the job runs.
# Kubernetes runs it with runAsUser 1000 and runAsNonRoot; then it runs as that user from the start.
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/opt/venv/bin/python", "/opt/app/container/entrypoint.py"]
CMD ["train"]
