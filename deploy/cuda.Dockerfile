# syntax=docker/dockerfile:1
# CUDA image: training on GPUs (torchrun, NCCL, bf16, FSDP), serving on a GPU, and the knowledge index
# on faiss-gpu.  Build from the repository root:
#   docker build -f deploy/cuda.Dockerfile -t meena-chatbot:cuda .
# Serve:  docker run --gpus all -p 8080:8080 -e REDIS_URL=... meena-chatbot:cuda serve --host 0.0.0.0 --device cuda
# Train:  docker run --gpus all --ipc=host -v $PWD/runs:/runs meena-chatbot:cuda \
#           torchrun --nproc_per_node 8 -m chatbot.cli train --preset large --fsdp --out /runs/large
#         (torchrun is the ENTRYPOINT's first argument here, so the entrypoint is reset: --entrypoint torchrun)

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3 takes security updates: a pinned version would stop building.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# faiss-gpu-cu12: the CUDA 12 faiss wheel (IVF-PQ on the GPU; docs/deploy.md, "The knowledge index at scale").
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install --no-cache-dir faiss-gpu-cu12==1.14.1.post1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatbot ./chatbot
COPY eval ./eval
COPY retrieval ./retrieval
RUN pip install --no-cache-dir .

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3 takes security updates: a pinned version would stop building.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 chatbot && mkdir /data && chown chatbot /data
USER 10001
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 CHATBOT_DATA=/data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatbot"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--device", "cuda"]
