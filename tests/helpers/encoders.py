"""A tiny random BERT-family encoder (fast, float64-capable), random token batches, and the shared data folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from gramrec.models.content_encoder import ContentEncoder, ItemTokens

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # ../shared/data beside the repo


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
