"""An exported version's item table as the starting table of a warm-started GRAM run.

A version's exported rows are its encoder's float32 encodings of its items. A run that warm-starts from that
version's checkpoint starts with the very same encoder, so for every item whose text is unchanged the row is the
encoding the run would compute: taking it skips re-encoding the catalog (the cost of a retrain that grows with the
catalog, not with the new data). New items, and items whose text changed since, are encoded as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from gramrec.service.artifact import ITEMS_EMBEDDINGS_FILE, ITEMS_INDEX_FILE
from gramrec.trainer.items import ItemCatalog


@dataclass
class KnownRows:
    """Item ids, the texts they were encoded from, and their rows [N, D]."""

    ids: list[str]
    texts: list[str]
    rows: np.ndarray

    @classmethod
    def from_artifact(cls, version_dir: Path) -> KnownRows:
        index = json.loads((Path(version_dir) / ITEMS_INDEX_FILE).read_text(encoding="utf-8"))
        rows = load_file(str(Path(version_dir) / ITEMS_EMBEDDINGS_FILE))["embeddings"]
        ids, texts = [str(i) for i in index["ids"]], [str(t) for t in index.get("texts", [])]
        if len(ids) != len(texts) or rows.shape[0] != len(ids):
            raise ValueError(f"{version_dir}: {len(ids)} ids, {len(texts)} texts and {rows.shape[0]} rows disagree")
        return cls(ids, texts, rows)

    def aligned(self, catalog: ItemCatalog, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices in `catalog`, rows) of the catalog's items known here with the same text."""
        if self.rows.ndim != 2 or self.rows.shape[1] != dim:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dim)  # another encoder: nothing is reusable
        mine = {item_id: i for i, item_id in enumerate(self.ids)}
        pairs = [
            (j, mine[item_id])
            for j, (item_id, text) in enumerate(zip(catalog.ids, catalog.texts, strict=True))
            if item_id in mine and self.texts[mine[item_id]] == text
        ]
        if not pairs:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dim)
        targets, sources = zip(*pairs, strict=True)
        return torch.tensor(targets, dtype=torch.long), torch.from_numpy(self.rows[list(sources)].astype(np.float32))
