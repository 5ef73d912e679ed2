"""Turns ragged rows of item indices into one flat list of item occurrences plus a padded layout into it.

Every strategy embeds the flat list its own way (E2E: one encoder pass per occurrence; GRAM: one per unique
item, gathered back), and the heads read embeddings through the positions. Padding points at one extra row,
index I, which the trainer fills with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PaddedField:
    """One field (e.g. history, candidates) of a batch in the padded [B, W] layout, W its longest row."""

    positions: torch.Tensor  # [B, W] index into the batch's occurrences; padding = I
    mask: torch.Tensor  # [B, W] bool, True = real


def pad_fields(fields: list[list[np.ndarray]]) -> tuple[torch.Tensor, list[PaddedField]]:
    """fields[f][b] = item indices of field f (e.g. history, candidates) in row b.

    -> (occurrences [I] int64, one PaddedField per field, each padded to its longest row).
    """
    flat: list[np.ndarray] = []
    layouts: list[tuple[np.ndarray, np.ndarray, int]] = []  # (starts, lengths, width) per field
    offset = 0
    for rows in fields:
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        starts = offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        offset += int(lengths.sum())
        flat.extend(rows)
        layouts.append((starts, lengths, max(1, int(lengths.max(initial=0)))))
    total = offset
    occurrences = torch.from_numpy(np.concatenate(flat).astype(np.int64) if flat else np.zeros(0, np.int64))
    padded = []
    for starts, lengths, width in layouts:
        column = np.arange(width, dtype=np.int64)[None, :]
        mask = column < lengths[:, None]
        positions = np.where(mask, starts[:, None] + column, total)
        padded.append(PaddedField(torch.from_numpy(positions), torch.from_numpy(mask)))
    return occurrences, padded
