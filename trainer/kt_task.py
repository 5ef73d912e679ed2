"""Knowledge tracing: windows of a student's answers -> batches, BCE loss, AUC and cold-start AUC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gramrec.models.heads import build_head
from gramrec.trainer.batches import PaddedField, pad_fields
from gramrec.trainer.distributed import SINGLE, World, shard_rows
from gramrec.trainer.kt_data import (
    KTSequence,
    load_kt_data,
    split_kt,
    split_kt_by_users,
)
from gramrec.trainer.metrics import kt_metrics
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.split_file import read_split


@dataclass
class KTBatch:
    occurrences: torch.Tensor  # [I] item index of every real answer
    items: PaddedField  # [B, T]
    correct: torch.Tensor  # [B, T] int64, 0 at padding

    def to(self, device: torch.device) -> KTBatch:
        return KTBatch(
            self.occurrences.to(device),
            PaddedField(self.items.positions.to(device), self.items.mask.to(device)),
            self.correct.to(device),
        )

    def rows(self) -> int:
        return self.items.positions.shape[0]

    def static_fields(self) -> list[PaddedField]:
        return [self.items]

    def with_static_fields(self, occurrences: torch.Tensor, fields: list[PaddedField]) -> KTBatch:
        (items,) = fields
        correct = np.zeros(tuple(items.mask.shape), dtype=np.int64)
        correct[: self.correct.shape[0], : self.correct.shape[1]] = self.correct.numpy()
        return KTBatch(occurrences, items, torch.from_numpy(correct))


def windows(sequences: list[KTSequence], max_len: int) -> list[KTSequence]:
    """Cuts long sequences into consecutive windows of at most max_len answers (each window starts fresh)."""
    out = []
    for seq in sequences:
        for start in range(0, len(seq.items), max_len):
            out.append(
                KTSequence(seq.user_id, seq.items[start : start + max_len], seq.correct[start : start + max_len])
            )
    return out


def make_batch(rows: list[KTSequence]) -> KTBatch:
    occurrences, (items,) = pad_fields([[row.items for row in rows]])
    correct = torch.zeros(items.mask.shape, dtype=torch.long)
    for b, row in enumerate(rows):
        correct[b, : len(row.correct)] = torch.from_numpy(row.correct)
    return KTBatch(occurrences, items, correct)


def gather(embeddings: torch.Tensor, field: PaddedField) -> torch.Tensor:
    """embeddings: [I + 1, D] (last row zeros) -> [B, W, D]"""
    return embeddings[field.positions]


class KnowledgeTracingTask:
    """Owns the data, splits and metric of knowledge tracing; the trainer stays task-agnostic."""

    primary_metric = "auc"

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        dataset = load_kt_data(settings.data)
        self.items = dataset.items
        explicit = read_split(settings.data)
        if explicit is not None:
            self.splits = split_kt_by_users(dataset, explicit.val, explicit.test, settings.data)
        else:
            self.splits = split_kt(dataset, seed=settings.seed, cold_item_frac=settings.cold_item_frac)
        self.train_windows = windows(self.splits.train, settings.max_seq_len)
        self.cold = np.zeros(len(self.items), dtype=bool)
        self.cold[self.splits.cold_items] = True

    def build_head(self, item_dim: int) -> nn.Module:
        return build_head("kt", item_dim, self.settings.hidden_dim)

    def steps_per_epoch(self) -> int:
        return -(-len(self.train_windows) // self.settings.batch_size)

    def train_batches(self, rng: np.random.Generator, world: World = SINGLE) -> list[KTBatch]:
        """The epoch's global batches (same on every rank for one rng), each cut to this rank's shard."""
        order = rng.permutation(len(self.train_windows))
        size = self.settings.batch_size
        starts = [s for s in range(0, len(order), size) if len(order[s : s + size]) >= world.size]
        return [make_batch(shard_rows([self.train_windows[i] for i in order[s : s + size]], world)) for s in starts]

    def interactions(self) -> int:
        return sum(len(w.items) for w in self.train_windows)

    @staticmethod
    def loss_terms(head: nn.Module, embeddings: torch.Tensor, batch: KTBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed BCE over real answers, number of real answers); the loss is their ratio over the global batch.

        embeddings: [I + 1, D] occurrence embeddings, last row zeros.
        """
        logits = head(gather(embeddings, batch.items), batch.correct)  # [B, T]
        mask = batch.items.mask
        total = F.binary_cross_entropy_with_logits(logits[mask], batch.correct[mask].to(logits.dtype), reduction="sum")
        return total, mask.sum()

    def static_caps(self) -> tuple[int]:
        """Width cap of the padded answer windows for the static-shape CF step."""
        return (self.settings.max_seq_len,)

    @staticmethod
    def static_loss_terms(
        head: nn.Module, embeddings: torch.Tensor, batch: KTBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """loss_terms for a padded batch (trainer/static_batches.py): a masked sum instead of boolean indexing,
        so no shape depends on the data. Padding sits at the end of each row, which the LSTM never looks back on."""
        logits = head(gather(embeddings, batch.items), batch.correct)  # [B, T]
        mask = batch.items.mask
        losses = F.binary_cross_entropy_with_logits(logits, batch.correct.to(logits.dtype), reduction="none")
        return (losses * mask.to(losses.dtype)).sum(), mask.sum()

    def eval_sequences(self, split: str) -> list[KTSequence]:
        return {"val": self.splits.val, "test": self.splits.test}[split]

    def eval_items(self, split: str) -> torch.Tensor:
        seqs = self.eval_sequences(split)
        return (
            torch.from_numpy(np.unique(np.concatenate([s.items for s in seqs])))
            if seqs
            else torch.zeros(0, dtype=torch.long)
        )

    @torch.no_grad()
    def evaluate(self, head: nn.Module, table: torch.Tensor, split: str) -> dict:
        """table: [N, D] embedding of every item (rows for eval_items(split) must be current)."""
        labels, logits, cold = self.logits(head, table, split)
        return kt_metrics(labels, torch.sigmoid(torch.from_numpy(logits).float()).numpy(), cold)

    @torch.no_grad()
    def logits(self, head: nn.Module, table: torch.Tensor, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, head logits float64, is-cold) of every answer of the split, each predicted from the answers
        before it; table as evaluate's. The export fits the served calibration on the validation ones."""
        device = table.device
        labels, logits, cold = [], [], []
        seqs = self.eval_sequences(split)
        for start in range(0, len(seqs), self.settings.batch_size):
            rows = seqs[start : start + self.settings.batch_size]
            batch = make_batch(rows).to(device)
            occurrence_table = torch.cat([table[batch.occurrences], table.new_zeros(1, table.shape[1])])
            out = head(gather(occurrence_table, batch.items), batch.correct)
            mask = batch.items.mask
            labels.append(batch.correct[mask].cpu().numpy())
            logits.append(out[mask].double().cpu().numpy())
            cold.append(self.cold[batch.occurrences.cpu().numpy()])
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, bool)
        return np.concatenate(labels), np.concatenate(logits), np.concatenate(cold)
