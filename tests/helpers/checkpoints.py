"""Small real checkpoints (tiny encoder, random head) for export and serving tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gramrec.models.content_encoder import ContentEncoder, load_tokenizer
from gramrec.models.heads import build_head
from gramrec.trainer.checkpoint import CheckpointMeta, save_checkpoint
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.settings import TrainSettings

ITEM_TEXTS = {
    "kt": [f"Write a Java method that solves exercise {i} about loops and arrays." for i in range(12)],
    "nr": [f"Headline {i}: markets, sports and weather news of the day" for i in range(12)],
}


def tiny_checkpoint(path: Path, encoder_dir: Path, task: str, data: Path | None = None) -> Path:
    """data: a kt data folder whose items the checkpoint is of (its validation split calibrates the export);
    default a folder that does not exist, with 12 made-up items."""
    settings = TrainSettings(task=task, data=data or Path("data/tiny"), hidden_dim=16, max_tokens=16)
    torch.manual_seed(0)
    encoder = ContentEncoder.from_pretrained(encoder_dir, pooling=settings.pooling).float()
    head = build_head(task, encoder.dim, hidden_dim=16)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # not a trivial (all-0.5) model
    texts = ITEM_TEXTS[task]
    items = ItemCatalog(ids=[f"{task}-item-{i}" for i in range(len(texts))], texts=texts)
    if data is not None:
        from gramrec.trainer.kt_data import load_kt_data

        items = load_kt_data(data).items
    meta = CheckpointMeta(json.loads(settings.model_dump_json()), 0, 1, 0.7, {"auc": 0.7})
    save_checkpoint(path, meta, encoder, load_tokenizer(encoder_dir), head, items, {})
    return path
