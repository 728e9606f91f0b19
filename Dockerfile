# diffstream on an NVIDIA CUDA runtime base: `diffstream serve` on port 8000.
#
#   docker build -t diffstream .
#   docker run --gpus all --network host diffstream               # GPU when present (auto)
#   docker run --network host -e DIFFSTREAM_DEVICES=cpu diffstream  # no GPU
#
# WebRTC media flows over UDP on ports ICE picks at random, so either run with --network host
# (Linux) or give the service a TURN server (DIFFSTREAM_TURN_SERVERS with _TURN_SECRET, or
# _TURN_USERNAME and _TURN_PASSWORD) that both sides can reach. Settings are DIFFSTREAM_*
# variables or serve flags.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    DIFFSTREAM_DEVICES=auto \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.12 (Ubuntu 24.04's) and make, for the same install commands the README uses.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04 images already have a user "ubuntu" with UID 1000, so let useradd pick one.
RUN useradd --create-home diffstream
WORKDIR /app
RUN chown diffstream /app
USER diffstream

# The Makefile's virtual environment and pinned torch first, so this large layer is cached
# across source changes (PyPI's torch wheel for Linux is the CUDA build).
COPY --chown=diffstream Makefile pyproject.toml ./
RUN make .venv/bin/python && .venv/bin/pip install -q torch==2.13.0

# Then the project itself: `make install` = the README's install step (torch is already there).
COPY --chown=diffstream . .
RUN make install

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["/app/.venv/bin/diffstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
