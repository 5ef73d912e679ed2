"""A NoFinetune checkpoint trained on the CPU carries its float32 item table; the export reuses it instead of
encoding every item again (the first start of news encodes its catalog once)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gramrec.models.content_encoder import ContentEncoder, load_tokenizer
from gramrec.models.heads import build_head
from gramrec.service.artifact import ITEMS_EMBEDDINGS_FILE
from gramrec.trainer.checkpoint import CheckpointMeta, save_checkpoint
from gramrec.trainer.export import export_checkpoint
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.settings import TrainSettings
from tests.helpers.checkpoints import ITEM_TEXTS


def nofinetune_checkpoint(path, encoder_dir, table_dtype=torch.float32):
    settings = TrainSettings(task="nr", data="data/tiny", strategy="nofinetune", hidden_dim=16, max_tokens=16)
    torch.manual_seed(0)
    encoder = ContentEncoder.from_pretrained(encoder_dir, pooling=settings.pooling).float().eval()
    head = build_head("nr", encoder.dim, hidden_dim=16)
    texts = ITEM_TEXTS["nr"]
    items = ItemCatalog(ids=[f"nr-item-{i}" for i in range(len(texts))], texts=texts)
    from gramrec.models.content_encoder import ItemTokens

    tokens = ItemTokens.from_texts(load_tokenizer(encoder_dir), texts, 16)
    with torch.no_grad():
        table = encoder.encode(tokens, torch.arange(len(texts)), 4, autocast=False).to(table_dtype)
    meta = CheckpointMeta(json.loads(settings.model_dump_json()), 0, 1, 0.7, {"auc": 0.7})
    save_checkpoint(path, meta, encoder, load_tokenizer(encoder_dir), head, items, {"table": table})
    return path, table


def test_export_reuses_a_nofinetune_table(tmp_path, tiny_encoder_dir, monkeypatch):
    checkpoint, table = nofinetune_checkpoint(tmp_path / "ckpt", tiny_encoder_dir)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the export encoded the catalog again")

    monkeypatch.setattr(ContentEncoder, "encode", no_encoding)
    version = export_checkpoint(checkpoint, tmp_path / "artifacts", version="nr-reuse-v1", progress=False)
    saved = load_file(str(version / ITEMS_EMBEDDINGS_FILE))["embeddings"]
    np.testing.assert_array_equal(saved, table.numpy())


def test_export_encodes_when_the_table_is_not_float32(tmp_path, tiny_encoder_dir):
    checkpoint, table = nofinetune_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, torch.bfloat16)
    encoded = []
    original = ContentEncoder.encode

    def counting(self, *args, **kwargs):
        encoded.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ContentEncoder, "encode", counting)
        export_checkpoint(checkpoint, tmp_path / "artifacts", version="nr-reuse-v2", progress=False)
    assert encoded, "a bf16 table must not be served: the export re-encodes in float32"
