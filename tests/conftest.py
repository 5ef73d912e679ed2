"""Shared fixtures (helpers and fakes are in tests/helpers/): the tiny encoder directory, the shared data folder,
exported tiny artifacts, settings per store backend, tiny training settings for first starts and retrains."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import redis
import torch
from transformers import BertConfig, BertModel

from gramrec.trainer.retrain.settings import WorkerSettings
from tests.helpers.encoders import SHARED_DATA
from tests.helpers.fakes import REDIS_URL, drop_prefix, redis_client

os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A small random BERT with the real MiniLM tokenizer, saved as a local Hugging Face model directory."""
    from gramrec.models.content_encoder import default_encoder_dir, load_tokenizer

    path = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    load_tokenizer(default_encoder_dir()).save_pretrained(path)
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def exported_artifacts(tmp_path_factory, tiny_encoder_dir) -> Path:
    """An artifacts root with tiny real exports, versions kt-e2e-v1 and nr-e2e-v1. Shared: copy before changing."""
    from gramrec.trainer.export import export_checkpoint
    from tests.helpers.checkpoints import tiny_checkpoint

    base = tmp_path_factory.mktemp("exported")
    for task in ("kt", "nr"):
        checkpoint = tiny_checkpoint(base / "checkpoints" / task, tiny_encoder_dir, task)
        export_checkpoint(checkpoint, base / "artifacts", version=f"{task}-e2e-v1", progress=False)
    return base / "artifacts"


@pytest.fixture
def settings_for(tmp_path, request):
    """Settings for the parametrized backend: a unique Redis prefix, or a fresh sqlite file.

    WorkerSettings (ServiceSettings plus the retrain loop's), so one object serves both the app and a trainer."""
    made: list[tuple[redis.Redis, str]] = []

    def make(backend: str, **overrides) -> WorkerSettings:
        if backend == "redis":
            client = redis_client()
            prefix = f"gramrec-test-{uuid.uuid4().hex[:12]}:"
            made.append((client, prefix))
            overrides = {"redis_url": REDIS_URL, "redis_key_prefix": prefix} | overrides
        else:
            overrides = {
                "redis_url": None,
                "embedded_store_path": tmp_path / f"store-{uuid.uuid4().hex[:6]}.sqlite3",
            } | overrides
        base = {"artifacts_dir": tmp_path / "artifacts", "model_poll_interval_s": 0, "bootstrap": False,
                "follow_activations": False}
        return WorkerSettings(**(base | overrides))

    yield make
    for client, prefix in made:
        drop_prefix(client, prefix)
        client.close()


@pytest.fixture
def tiny_training_env(monkeypatch, tiny_encoder_dir):
    """Training in these tests (first starts, and retrains without a base checkpoint) uses the tiny random encoder
    and a small head: given as the first start's explicit training settings (retrains keep the base's)."""
    train = json.dumps({"encoder_dir": str(tiny_encoder_dir), "hidden_dim": 16, "max_tokens": 16, "progress": False})
    monkeypatch.setenv("GRAMREC_BOOTSTRAP_TRAIN", train)
    return {"GRAMREC_BOOTSTRAP_TRAIN": train}
