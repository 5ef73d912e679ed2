"""News recommendation: (history, 1 click + K non-clicks) samples, softmax loss, per-impression ranking metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gramrec.models.heads import build_head
from gramrec.trainer.batches import PaddedField, pad_fields
from gramrec.trainer.distributed import SINGLE, World, shard_rows
from gramrec.trainer.metrics import news_metrics
from gramrec.trainer.mind_data import (
    Impression,
    load_mind,
    split_mind,
    split_mind_by_ids,
)
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.split_file import read_split


@dataclass
class NewsBatch:
    occurrences: torch.Tensor  # [I] item index of every history entry and candidate
    history: PaddedField  # [B, L]
    candidates: PaddedField  # [B, C]; training puts the click at column 0

    def to(self, device: torch.device) -> NewsBatch:
        def move(field: PaddedField) -> PaddedField:
            return PaddedField(field.positions.to(device), field.mask.to(device))

        return NewsBatch(self.occurrences.to(device), move(self.history), move(self.candidates))

    def rows(self) -> int:
        return self.history.positions.shape[0]

    def static_fields(self) -> list[PaddedField]:
        return [self.history, self.candidates]

    def with_static_fields(self, occurrences: torch.Tensor, fields: list[PaddedField]) -> NewsBatch:
        history, candidates = fields
        return NewsBatch(occurrences, history, candidates)


@dataclass
class ClickSample:
    history: np.ndarray  # last history_len clicks
    clicked: int
    non_clicked: np.ndarray  # all non-clicked candidates of the impression


def click_samples(impressions: list[Impression], history_len: int) -> list[ClickSample]:
    """One sample per click that has at least one non-clicked candidate beside it."""
    samples: list[ClickSample] = []
    for imp in impressions:
        negatives = imp.candidates[imp.labels == 0]
        if len(negatives) == 0:
            continue
        history = imp.history[-history_len:]
        samples.extend(ClickSample(history, int(c), negatives) for c in imp.candidates[imp.labels == 1])
    return samples


def make_batch(histories: list[np.ndarray], candidates: list[np.ndarray]) -> NewsBatch:
    occurrences, (history, cands) = pad_fields([histories, candidates])
    return NewsBatch(occurrences, history, cands)


class NewsTask:
    """Owns the MIND data, the time split and the ranking metrics; the trainer stays task-agnostic."""

    primary_metric = "auc"

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        explicit = read_split(settings.data)  # with one, times are not needed (gramrec evaluate on test-only data)
        dataset = load_mind(settings.data, use_abstract=settings.use_abstract, times_required=explicit is None)
        self.items = dataset.items
        self.splits = (
            split_mind(dataset)
            if explicit is None
            else split_mind_by_ids(dataset, explicit.val, explicit.test, settings.data)
        )
        self.samples = click_samples(self.splits.train, settings.history_len)

    def build_head(self, item_dim: int) -> nn.Module:
        return build_head("nr", item_dim, self.settings.hidden_dim)

    def steps_per_epoch(self) -> int:
        return -(-len(self.samples) // self.settings.batch_size)

    def interactions(self) -> int:
        return sum(len(s.history) + 1 + self.settings.negatives for s in self.samples)

    def train_batches(self, rng: np.random.Generator, world: World = SINGLE) -> list[NewsBatch]:
        """Shuffled samples; K non-clicks drawn from the same impression (with replacement only if too few).

        The global batches are the same on every rank for one rng; each rank keeps its shard of each.
        """
        k = self.settings.negatives
        order = rng.permutation(len(self.samples))
        batches = []
        for start in range(0, len(order), self.settings.batch_size):
            rows = [self.samples[i] for i in order[start : start + self.settings.batch_size]]
            candidates = [
                np.concatenate([[r.clicked], rng.choice(r.non_clicked, k, replace=len(r.non_clicked) < k)])
                for r in rows
            ]
            if len(rows) < world.size:
                continue
            rows, candidates = shard_rows(rows, world), shard_rows(candidates, world)
            batches.append(make_batch([r.history for r in rows], candidates))
        return batches

    @staticmethod
    def loss_terms(head: nn.Module, embeddings: torch.Tensor, batch: NewsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed softmax cross-entropy of each click (column 0) against its K non-clicks, number of clicks)."""
        scores = head(
            embeddings[batch.history.positions], batch.history.mask, embeddings[batch.candidates.positions]
        )  # [B, 1 + K]
        target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        return F.cross_entropy(scores, target, reduction="sum"), torch.tensor(scores.shape[0], device=scores.device)

    def static_caps(self) -> tuple[int, int]:
        """Width caps of the padded fields (history, candidates) for the static-shape CF step."""
        return self.settings.history_len, 1 + self.settings.negatives

    @staticmethod
    def static_loss_terms(
        head: nn.Module, embeddings: torch.Tensor, batch: NewsBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """loss_terms for a padded batch (trainer/static_batches.py), with no data-dependent shapes: padded
        candidate columns score the lowest float, and a row counts only if its click (column 0) is real."""
        scores = head(embeddings[batch.history.positions], batch.history.mask, embeddings[batch.candidates.positions])
        scores = scores.masked_fill(~batch.candidates.mask, torch.finfo(scores.dtype).min)
        real = batch.candidates.mask[:, 0]
        target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        losses = F.cross_entropy(scores, target, reduction="none")
        return (losses * real.to(losses.dtype)).sum(), real.sum()

    def eval_impressions(self, split: str) -> list[Impression]:
        return {"val": self.splits.val, "test": self.splits.test}[split]

    def eval_items(self, split: str) -> torch.Tensor:
        imps = self.eval_impressions(split)
        if not imps:
            return torch.zeros(0, dtype=torch.long)
        hl = self.settings.history_len
        return torch.from_numpy(
            np.unique(np.concatenate([np.concatenate([i.history[-hl:], i.candidates]) for i in imps]))
        )

    @torch.no_grad()
    def evaluate(self, head: nn.Module, table: torch.Tensor, split: str) -> dict:
        """Scores every candidate of every impression; metrics averaged per impression."""
        groups = []
        imps = self.eval_impressions(split)
        hl = self.settings.history_len
        for start in range(0, len(imps), self.settings.batch_size):
            rows = imps[start : start + self.settings.batch_size]
            batch = make_batch([r.history[-hl:] for r in rows], [r.candidates for r in rows]).to(table.device)
            emb = torch.cat([table[batch.occurrences], table.new_zeros(1, table.shape[1])])
            scores = head(emb[batch.history.positions], batch.history.mask, emb[batch.candidates.positions])
            scores = scores.float().cpu().numpy()
            for b, row in enumerate(rows):
                groups.append((row.labels, scores[b, : len(row.candidates)]))
        return news_metrics(groups)
