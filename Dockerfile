# Endless Radio: one image for a CUDA GPU and for CPU.
#
#   docker build -t endless-radio .
#   docker build -t endless-radio:cpu --build-arg TORCH_INDEX=<PyTorch's CPU-only wheel index URL> .
#
#   GPU (needs the NVIDIA driver and the NVIDIA Container Toolkit on the host):
#   docker run --gpus all -p 8000:8000 -v radio-data:/data endless-radio
#   CPU (the same image, or the smaller :cpu one):
#   docker run -p 8000:8000 -v radio-data:/data endless-radio
#   Offline demo with a random-weight model (makes noise, not music; no download):
#   docker run -p 8000:8000 -v radio-data:/data endless-radio \
#     sh -c 'radio tiny-model /data/tiny && exec radio serve --config /etc/radio/config.toml --model /data/tiny'
#   Your own settings:  -v "$PWD/config.toml:/etc/radio/config.toml:ro"
#
# Why python:3.11-slim plus torch from pip, not the pytorch/pytorch CUDA image: the torch
# wheels on PyPI for Linux x86_64 are CUDA builds that carry their own CUDA and cuDNN libraries
# (the host only provides the driver through --gpus), and they fall back to the CPU when no GPU
# is visible, so one image serves both. The slim base keeps the Python version and Debian
# packages (ffmpeg) under our control, with no conda layer. TORCH_INDEX switches to the
# CPU-only wheels for a much smaller image on machines without a GPU.
#
# /data is the volume: the Hugging Face model cache (HF_HOME=/data/hf), the radio's state, and
# what the first start builds: the CPU kernels (TORCH_EXTENSIONS_DIR), a GPU's compiled step
# (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR: minutes to compile, seconds to reload).

FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# empty: pip's default index, whose Linux wheels are CUDA builds (they run on GPU and CPU);
# PyTorch's CPU-only wheel index gives a much smaller image for machines without a GPU
ARG TORCH_INDEX=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    TORCH_EXTENSIONS_DIR=/data/torch_extensions \
    TORCHINDUCTOR_CACHE_DIR=/data/inductor \
    TRITON_CACHE_DIR=/data/triton \
    ENDLESS_RADIO_CACHE=/data/cache

# ffmpeg: the command-line tools for checking streams from inside the container (the radio
# itself encodes through PyAV's bundled libraries). g++: builds the CPU decode kernels
# (engine/kernels) on first start, on CPUs with AVX-512 BF16, and the codec's (engine/codec) on
# CPUs with AVX2. Debian versions are not pinned:
# the archive drops old ones, and the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: it is by far the largest and changes least often.
RUN if [ -n "${TORCH_INDEX}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /opt/radio
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY radio ./radio
RUN pip install --no-cache-dir . \
    && python -c "import engine, radio, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY config.toml /etc/radio/config.toml

RUN useradd --create-home --uid 10001 --user-group radio \
    && mkdir -p /data/hf \
    && chown -R radio:radio /data
# numeric, so that Kubernetes' runAsNonRoot can check it: 10001 is "radio"
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]

EXPOSE 8000

# /healthz answers once the server is up; the start period covers a first model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["radio", "serve", "--config", "/etc/radio/config.toml"]
