# The gramrec trainer (GPU): first-start models, retrains (`gramrec trainer`, compose's default command) and
# one-off train + export runs (train-and-export). Build from the repo root:
#   docker build -f docker/trainer.Dockerfile -t gramrec-trainer .
# Needs the NVIDIA container toolkit at run time (compose reserves one GPU). Configuration: GRAMREC_* variables
# (trainer/settings.py: GRAMREC_TRAIN_TASK, GRAMREC_TRAIN_DATA, GRAMREC_TRAIN_OUT, GRAMREC_TRAIN_EPOCHS, ...), see docker/train-and-export.sh.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# The default torch wheel is the CUDA build.
RUN pip install torch==2.13.0

COPY pyproject.toml README* ./
COPY models ./models
COPY trainer ./trainer
COPY service ./service
COPY docker/train-and-export.sh /usr/local/bin/train-and-export
# onnxruntime (CPU) only: the trainer uses ONNX Runtime just to check each export against PyTorch, on
# CPUExecutionProvider; the item table is encoded by PyTorch on the GPU. (onnxruntime-gpu was installed here,
# unpinned, and never used; it is gone until a CUDA provider is wired in and measured.)
RUN pip install . \
    && chmod +x /usr/local/bin/train-and-export

RUN useradd --create-home --uid 10001 gramrec \
    && mkdir -p /data/artifacts /data/datasets /data/runs \
    && chown -R gramrec /data
USER gramrec

ENV GRAMREC_TRAIN_OUT=/data/runs/latest \
    GRAMREC_ARTIFACTS_DIR=/data/artifacts \
    GRAMREC_TRAIN_DEVICE=cuda

CMD ["train-and-export"]
