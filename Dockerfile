# stt-bridge as a container. The same steps as `make python-packages`, without the test tools.
#
#   CPU (default: Debian 12, PyTorch's CPU wheel, the moonshine CPU engine unless a GPU shows up):
#     docker build -t stt-bridge .
#   GPU (CUDA base image, PyPI's CUDA build of torch, the kyutai engine):
#     docker build -t stt-bridge:gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL= .
#     docker run --gpus all ...
#
# The service runs as the unprivileged user `stt-bridge` (uid 10001); the store, the webhook
# outbox and the model cache live under /var/lib/stt-bridge (mount a volume there).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# Both bases get Python from apt: 3.11 on Debian 12, 3.12 on Ubuntu 24.04 (the project needs >= 3.11).
ARG TORCH=torch==2.13.0
# The CPU wheel index keeps the CPU image small; empty = PyPI (the CUDA build) for GPU images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MOSHI=moshi==0.2.13

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/stt-bridge \
        --create-home --shell /usr/sbin/nologin stt-bridge

WORKDIR /opt/stt-bridge
RUN python3 -m venv .venv \
    && .venv/bin/pip install -q --upgrade pip \
    && .venv/bin/pip install -q "${TORCH}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

# Dependencies first (a layer that survives code changes), then the code.
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY telephony/ telephony/
COPY api/ api/
COPY configs/ configs/
RUN .venv/bin/pip install -q -e . \
    # moshi pins torch<2.10 (a multi-GB CUDA build on PyPI): take it without its pins.
    && .venv/bin/pip install -q --no-deps "${MOSHI}" \
    && .venv/bin/python -c "import moshi.models, onnxruntime, moonshine_cpp, silero_vad, soxr, aiohttp"

ENV PATH=/opt/stt-bridge/.venv/bin:$PATH \
    HOME=/var/lib/stt-bridge \
    HF_HOME=/var/lib/stt-bridge/huggingface \
    STT_BRIDGE_DATA_DIR=/var/lib/stt-bridge/data \
    STT_BRIDGE_LOG_JSON=true

USER stt-bridge:stt-bridge
VOLUME ["/var/lib/stt-bridge"]

# 8080 audio WebSockets + API, 8001 health/ready/metrics, 8000 web client, 9092 AudioSocket;
# SIP (off by default) would add 5060/udp+tcp and the RTP range 20000-20999/udp.
EXPOSE 8080 8001 8000 9092

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=4)"]

# SIGTERM drains (no new calls, live ones finish or are flushed at server.drain_timeout_s):
# give `docker stop` more time than that (`docker stop -t 60`, compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["stt-bridge", "serve"]
