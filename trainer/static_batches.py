"""Static shapes for the graphed CF step: every batch padded to one of a few bucketed sizes.

A CUDA graph replays fixed shapes, so each batch is padded to the full batch size and each field's width to the
smallest of a few buckets that holds it (a quarter, half or all of the field's cap). Padding provably changes
nothing: padded positions point at the zero row and are masked, padded rows have no real entry (they add zero to
the loss and to its count), and the padded occurrences repeat the batch's first real item, which no position reads,
so their gradient is exactly zero and a table update adds nothing to that (already touched) row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from gramrec.trainer.batches import PaddedField


def bucket(length: int, cap: int) -> int:
    """The smallest of cap/4, cap/2 and cap (rounded up) that holds `length`; past the cap, a power of two."""
    for size in (-(-cap // 4), -(-cap // 2), cap):
        if length <= size:
            return max(1, size)
    return 1 << (length - 1).bit_length()


def pad_field(field: PaddedField, rows: int, width: int, pad_index: int) -> PaddedField:
    """[B, W] -> [rows, width]; every padded or masked position points at `pad_index` (the zero row).
    In numpy: a handful of small torch ops per field cost more host time than the graphed step itself."""
    b, w = field.positions.shape
    mask = field.mask.numpy()
    positions = np.full((rows, width), pad_index, dtype=np.int64)
    positions[:b, :w] = np.where(mask, field.positions.numpy(), pad_index)
    padded_mask = np.zeros((rows, width), dtype=bool)
    padded_mask[:b, :w] = mask
    return PaddedField(torch.from_numpy(positions), torch.from_numpy(padded_mask))


def pad_occurrences(occurrences: torch.Tensor, size: int) -> torch.Tensor:
    """[I] -> [size], padded with the first real item (no position reads the padded entries)."""
    if len(occurrences) == 0:
        raise ValueError("a batch without item occurrences cannot take the static CF step")
    padded = np.empty(size, dtype=np.int64)
    padded[: len(occurrences)] = occurrences.numpy()
    padded[len(occurrences) :] = padded[0]
    return torch.from_numpy(padded)


@dataclass
class StaticBatch:
    """A task batch padded to a bucketed shape. `real` occurrences come first, then padding."""

    batch: Any  # NewsBatch or KTBatch, every tensor at its bucketed shape
    real: int  # occurrences before the padding
    key: tuple  # the bucketed shape: one CUDA graph per key

    def to(self, device: torch.device) -> StaticBatch:
        return replace(self, batch=self.batch.to(device))


def pad_batch(batch, rows: int, caps: tuple[int, ...]) -> StaticBatch:
    """Pads a task batch (its fields, in the order of `caps`) to `rows` rows and bucketed widths."""
    fields: list[PaddedField] = batch.static_fields()
    widths = tuple(bucket(f.positions.shape[1], cap) for f, cap in zip(fields, caps, strict=True))
    if batch.rows() > rows:
        raise ValueError(f"batch of {batch.rows()} rows exceeds the static batch size {rows}")
    size = rows * sum(widths)
    padded = [pad_field(f, rows, w, size) for f, w in zip(fields, widths, strict=True)]
    occurrences = pad_occurrences(batch.occurrences, size)
    return StaticBatch(batch.with_static_fields(occurrences, padded), len(batch.occurrences), (rows, widths))
