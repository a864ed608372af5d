# syntax=docker/dockerfile:1
# prunepipe images, two targets with the same pins as the README's set-up: the requirements
# files are installed by file, never re-typed here.
#
#   docker build -t prunepipe:gpu .                 # default: CUDA 13 runtime, DALI, DeepSpeed
#   docker build --target cpu -t prunepipe:cpu .    # slim CPU image for the demo
#
#   docker run --rm --gpus all --shm-size=32g -v /data:/data -v /shared:/shared \
#       prunepipe:gpu search configs/imagenet_resnet101.yaml
#
# torch and torchvision are the registry's CUDA 13 builds (requirements.txt): torchvision's
# compiled ops link against them, and the same wheels run on CPU, so the CPU target installs
# them too. The CUDA user-space libraries come with those wheels (nvidia-* packages); the GPU
# target's base adds what a CUDA runtime image carries for DALI and the driver's side.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# The project's own files, in one place for both targets.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY pipeline /src/pipeline
COPY methods /src/methods
COPY launch /src/launch
COPY configs /src/configs


# ---- cpu: `make demo` in a container (DDP over gloo, WebDataset loader) --------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
RUN python -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group prunepipe
WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY --from=source /src /app
# A plain (not editable) install: the image is the release. The build's scratch is removed.
RUN pip install --no-cache-dir --no-deps /app \
    && rm -rf /app/build /app/*.egg-info \
    && install -d -o prunepipe -g prunepipe /app/data /app/runs
# numeric, so that Kubernetes' runAsNonRoot can verify it (launch/kuberay-rayjob.yaml runs as 10001)
USER 10001:10001
ENTRYPOINT ["prunepipe"]
CMD ["--help"]


# ---- gpu (default): CUDA 13 runtime, DALI for CUDA 13, DeepSpeed ---------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
# Ubuntu 24.04's Python 3.12; rsync because Ray's cluster launcher (`ray up` with docker)
# copies its bootstrap files into the container with it. Distribution packages follow the
# base image's release, so they are not version-pinned.
# The profile.d line is single-quoted on purpose: $PATH expands at login, not at build.
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv rsync \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group prunepipe \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/prunepipe-venv.sh
WORKDIR /app
COPY requirements.txt requirements-deepspeed.txt ./
RUN pip install --no-cache-dir -r requirements.txt
# DeepSpeed builds from its source archive against the torch above: no ops compiled now (they
# are JIT-built on first use), and no build isolation, so pip does not fetch a second torch.
# A layer of its own: changing it does not re-download the 5 GB of torch above.
# hadolint ignore=DL3059
RUN DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation -r requirements-deepspeed.txt
COPY --from=source /src /app
RUN pip install --no-cache-dir --no-deps /app \
    && rm -rf /app/build /app/*.egg-info \
    && install -d -o prunepipe -g prunepipe /app/data /app/runs
# numeric, so that Kubernetes' runAsNonRoot can verify it (launch/kuberay-rayjob.yaml runs as 10001)
USER 10001:10001
ENTRYPOINT ["prunepipe"]
CMD ["--help"]
