# A first version: the CUDA build of torch from PyPI runs on GPU nodes and on CPU alike.
# Build:  docker build -t prunepipe .
# Run:    docker run --gpus all -v /data:/data -v /shared:/shared prunepipe search configs/imagenet_resnet101.yaml
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/prunepipe
COPY requirements.txt requirements-dev.txt ./
RUN pip install -r requirements.txt -r requirements-dev.txt
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY methods ./methods
COPY launch ./launch
COPY configs ./configs
COPY tests ./tests
RUN pip install --no-deps --no-build-isolation -e .

# Run as an unprivileged user: pruned models and registries are read, never executed.
RUN useradd --create-home prunepipe && chown -R prunepipe /opt/prunepipe
USER prunepipe
ENTRYPOINT ["prunepipe"]
CMD ["--help"]
