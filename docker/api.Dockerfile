# The gramrec API server (CPU). Build from the repository root:
#   docker build -f docker/api.Dockerfile -t gramrec-api .
# Configuration is by environment variables only (service/settings.py): REDIS_URL, GRAMREC_*.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# CPU-only torch first (the default wheel pulls several GB of CUDA libraries the API never uses). torch is
# needed only to bootstrap (train + export) a model on first start; serving itself runs ONNX Runtime.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README* ./
COPY models ./models
COPY trainer ./trainer
COPY service ./service
RUN pip install .

RUN useradd --create-home --uid 10001 gramrec \
    && mkdir -p /data/artifacts /data/datasets \
    && chown -R gramrec /data
USER gramrec

ENV GRAMREC_HOST=0.0.0.0 \
    GRAMREC_PORT=8000 \
    GRAMREC_ARTIFACTS_DIR=/data/artifacts \
    GRAMREC_EMBEDDED_STORE_PATH=/data/artifacts/item-table.sqlite3 \
    GRAMREC_BOOTSTRAP_KT_DATA=/data/datasets/codeworkout_s19 \
    GRAMREC_BOOTSTRAP_NR_DATA=/data/datasets/mind_small_subset

EXPOSE 8000
VOLUME ["/data/artifacts"]

# Ready = a warmed model per task and a store that answers. The start period covers a bootstrap training.
HEALTHCHECK --interval=10s --timeout=3s --start-period=900s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"GRAMREC_PORT\", \"8000\")}/readyz', timeout=2)"

CMD ["gramrec", "serve"]
