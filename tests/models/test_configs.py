"""Each model's config is saved with its checkpoint and manifest, and rebuilds the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gramrec.models.configs import NewsHeadConfig, default_head_config
from gramrec.models.content_encoder import ContentEncoder, load_tokenizer
from gramrec.models.heads import build_head
from gramrec.models.news_head import NewsHead
from gramrec.trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_trained_model,
    load_weights,
    save_checkpoint,
)
from gramrec.trainer.export import export_checkpoint
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.settings import TrainSettings


def news_checkpoint(path: Path, encoder_dir: Path, head: torch.nn.Module) -> Path:
    settings = TrainSettings(task="nr", data=Path("data/tiny"), max_tokens=16)
    encoder = ContentEncoder.from_pretrained(encoder_dir, pooling="attention", attention_dim=24)
    items = ItemCatalog(ids=["N1", "N2"], texts=["Markets rally", "Storm warning for the coast"])
    meta = CheckpointMeta(json.loads(settings.model_dump_json()), 0, 1, 0.5)
    save_checkpoint(path, meta, encoder, load_tokenizer(encoder_dir), head, items, {})
    return path


def test_the_default_news_head_takes_the_most_heads_dividing_the_dim():
    assert default_head_config("nr", 384).num_heads == 12 and default_head_config("nr", 32).num_heads == 8
    assert build_head("nr", 32).config == NewsHeadConfig(item_dim=32, num_heads=8)


def test_a_checkpoint_rebuilds_its_own_head_not_todays_default(tmp_path, tiny_encoder_dir):
    """4 heads where today's default would build 8: same weight shapes, so only the saved config can tell."""
    checkpoint = news_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, NewsHead(32, num_heads=4, attention_dim=16))
    saved = json.loads((checkpoint / "config.json").read_text())["model"]
    assert saved["head"] == {"item_dim": 32, "num_heads": 4, "attention_dim": 16, "dropout": 0.2, "kind": "nr"}
    assert saved["encoder"] == {"pooling": "attention", "dim": 32, "attention_dim": 24}
    model = load_trained_model(checkpoint)
    assert model.head.config.num_heads == 4 and model.head.self_attention.num_heads == 4
    assert model.encoder.config.attention_dim == 24


def test_loading_into_a_different_model_is_refused(tmp_path, tiny_encoder_dir):
    checkpoint = news_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, NewsHead(32, num_heads=4))
    encoder = ContentEncoder.from_pretrained(tiny_encoder_dir, pooling="attention", attention_dim=24)
    with pytest.raises(CheckpointError, match="differs from the one built"):
        load_weights(checkpoint, encoder, NewsHead(32, num_heads=8))


def test_an_old_checkpoint_without_a_model_config_fails_clearly(tmp_path, tiny_encoder_dir):
    checkpoint = news_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, build_head("nr", 32))
    config = json.loads((checkpoint / "config.json").read_text())
    del config["model"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no model config .* older gramrec"):
        load_trained_model(checkpoint)


def test_the_manifest_carries_the_model_config(tmp_path, tiny_encoder_dir):
    checkpoint = news_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, NewsHead(32, num_heads=2))
    version = export_checkpoint(checkpoint, tmp_path / "artifacts", version="nr-config", progress=False)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["model"]["head"]["num_heads"] == 2 and manifest["model"]["encoder"]["pooling"] == "attention"
