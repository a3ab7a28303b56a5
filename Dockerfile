# One-shot labeling ML backend for Label Studio, GPU image.
#
#   docker build -t oneshot-labeler .                       # vit_h + DINOv2-L (about 3.7 GB of weights)
#   docker build --build-arg SAM_MODEL_TYPE=vit_b \
#                --build-arg ENCODER=vit_small_patch14_dinov2.lvd142m -t oneshot-labeler:small .
#   docker run --gpus all -p 9090:9090 -v oneshot-models:/models oneshot-labeler
#
# The checkpoints are downloaded at build time into /models, a volume: the container starts
# offline, and the state store (SQLite, when REDIS_URL is not set) persists in the same volume.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 app
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first: this layer is reused while only the code changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

ARG SAM_MODEL_TYPE=vit_h
ARG ENCODER=vit_large_patch14_dinov2.lvd142m
ENV SAM_MODEL_TYPE=${SAM_MODEL_TYPE} \
    ENCODER=${ENCODER} \
    MODEL_DIR=/models \
    HF_HOME=/models/hf \
    DEVICE=auto

COPY matcher_core/ matcher_core/
COPY labelstudio/ labelstudio/
COPY backend/ backend/
COPY scripts/download_models.py scripts/
COPY model.py _wsgi.py ./
RUN mkdir -p /models \
    && python scripts/download_models.py \
    && chown -R app:app /models
VOLUME /models

USER app
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"
# One worker (the models load once per process) with more threads than concurrent /predict
# calls, so /health always finds a free thread (see SECURITY.md, bench/load.py).
CMD ["gunicorn", "--workers", "1", "--threads", "16", "--timeout", "300", \
     "--bind", "0.0.0.0:9090", "--access-logfile", "-", "_wsgi:app"]
