"""Shared fixtures: a tiny random BERT-family encoder (fast, float64-capable) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from transformers import BertConfig, BertModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_encoder(pooling: str = "mean", seed: int = 0, dtype=torch.float64, dropout: float = 0.0) -> ContentEncoder:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    backbone = BertModel(config, add_pooling_layer=False)
    return ContentEncoder(backbone, pooling=pooling, attention_dim=8).to(dtype)


def random_tokens(num_items: int, max_len: int = 9, seed: int = 0) -> ItemTokens:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (num_items,), generator=g)
    ids = torch.randint(1, 64, (num_items, max_len), generator=g)
    ids[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0
    return ItemTokens(input_ids=ids, lengths=lengths)


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

    from tests.test_service_e2e import tiny_checkpoint

    base = tmp_path_factory.mktemp("exported")
    for task in ("kt", "nr"):
        checkpoint = tiny_checkpoint(base / "checkpoints" / task, tiny_encoder_dir, task)
        export_checkpoint(checkpoint, base / "artifacts", version=f"{task}-e2e-v1", progress=False)
    return base / "artifacts"
