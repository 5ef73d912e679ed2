"""Synthetic training workloads with the statistics of the GRAM paper's datasets, for the training benchmark.

Each workload is a catalog of items with random token ids (an `ItemTokens`, no tokenizer involved) whose
lengths are drawn around the dataset's mean, plus user interactions whose items follow a seeded Zipf-like
popularity (p(rank r) ~ r^-exponent, ranks assigned to items by a random permutation so popularity is
independent of text length). The interactions are fed through the real task classes' batch building
(`windows` + `make_batch` for knowledge tracing, `ClickSample` + `NewsTask.train_batches` for news), so the
benchmark steps are the trainer's steps.

What counts as an interaction follows the paper: for knowledge tracing one answer (= one item occurrence in
a batch); for news recommendation one click, which becomes one training sample of `history_len` clicked
news plus 1 clicked and `negatives` non-clicked candidates, i.e. 1 + history_len + negatives item
occurrences. `--scale` keeps that fraction of the interactions; the item catalog is always kept whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gramrec.models.content_encoder import ItemTokens
from gramrec.trainer.kt_data import KTSequence
from gramrec.trainer.kt_task import KnowledgeTracingTask, windows
from gramrec.trainer.nr_task import ClickSample, NewsTask
from gramrec.trainer.settings import TrainSettings

CLS_ID, SEP_ID = 101, 102  # BERT-family specials; any id works for speed, these keep the rows realistic
MIN_TOKENS, MAX_TOKENS = 4, 512


@dataclass(frozen=True)
class SyntheticSpec:
    """Paper-scale statistics of one dataset, and the defaults that fit the benchmark's time budget on an H100."""

    name: str
    task: str  # "kt" or "nr"
    num_items: int
    interactions: int  # KT: answers; NR: clicks (training samples)
    mean_tokens: float
    default_scale: float
    default_batch_size: int
    kt_seq_len: tuple[int, int] = (100, 200)  # KT: users' sequence lengths, uniform in [lo, hi]


SPECS: dict[str, SyntheticSpec] = {
    "mind-title": SyntheticSpec("mind-title", "nr", 104_150, 3_760_125, 11.5, default_scale=0.005, default_batch_size=32),
    "poj": SyntheticSpec("poj", "kt", 2_597, 898_384, 271.0, default_scale=0.1, default_batch_size=16),
    "toeic": SyntheticSpec("toeic", "kt", 9_336, 94_264_845, 147.0, default_scale=0.01, default_batch_size=32),
}


def zipf_probabilities(num_items: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """[N] item probabilities: p ~ rank^-exponent, with ranks given to items by a seeded random permutation."""
    by_rank = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
    by_rank /= by_rank.sum()
    probs = np.empty(num_items)
    probs[rng.permutation(num_items)] = by_rank
    return probs


def expected_unique(probs: np.ndarray, draws: float) -> float:
    """Expected number of distinct items among `draws` independent draws from `probs`."""
    return float(np.sum(-np.expm1(draws * np.log1p(-np.minimum(probs, 1 - 1e-12)))))


def synthetic_tokens(
    num_items: int, mean_tokens: float, vocab_size: int, rng: np.random.Generator, max_tokens: int = MAX_TOKENS
) -> ItemTokens:
    """Random token ids with lengths ~ Normal(mean, 0.35 * mean) clipped to [4, max_tokens] ([CLS] ... [SEP])."""
    max_tokens = max(MIN_TOKENS, min(MAX_TOKENS, max_tokens))
    lengths = np.rint(rng.normal(mean_tokens, 0.35 * mean_tokens, num_items))
    lengths = np.clip(lengths, MIN_TOKENS, max_tokens).astype(np.int64)
    width = int(lengths.max())
    low = 1000 if vocab_size > 2000 else 3
    ids = rng.integers(low, vocab_size, size=(num_items, width), dtype=np.int64)
    ids[:, 0] = CLS_ID if vocab_size > SEP_ID else 1
    ids[np.arange(num_items), lengths - 1] = SEP_ID if vocab_size > SEP_ID else 2
    ids[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return ItemTokens(input_ids=torch.from_numpy(ids), lengths=torch.from_numpy(lengths))


class SyntheticKTTask(KnowledgeTracingTask):
    """Knowledge tracing on synthetic students: the real task's batches and loss, no data files.

    Users answer `kt_seq_len` = U[100, 200] questions each, drawn i.i.d. from the Zipf popularity, correct
    with probability 0.6; sequences are cut into `max_seq_len` windows exactly as the real task does.
    """

    def __init__(self, settings: TrainSettings, spec: SyntheticSpec, probs: np.ndarray, interactions: int,
                 rng: np.random.Generator):
        self.settings = settings
        lo, hi = spec.kt_seq_len
        lengths = rng.integers(lo, hi + 1, size=interactions // lo + 1)
        ends = np.cumsum(lengths)
        count = int(np.searchsorted(ends, interactions)) + 1
        lengths = lengths[:count]
        lengths[-1] -= int(ends[count - 1]) - interactions  # the last user stops at the requested total
        items = rng.choice(len(probs), size=interactions, p=probs).astype(np.int64)
        correct = (rng.random(interactions) < 0.6).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        sequences = [KTSequence(f"u{u}", items[s : s + n], correct[s : s + n])
                     for u, (s, n) in enumerate(zip(starts, lengths, strict=True)) if n > 0]
        self.train_windows = windows(sequences, settings.max_seq_len)
        self.num_interactions = interactions

    def clicks(self) -> int:
        return self.num_interactions


class SyntheticNewsTask(NewsTask):
    """News recommendation on synthetic readers: per click a history of `history_len` news and a pool of
    `negatives` non-clicked news, all drawn from the Zipf popularity; batches and loss are the real task's."""

    def __init__(self, settings: TrainSettings, spec: SyntheticSpec, probs: np.ndarray, interactions: int,
                 rng: np.random.Generator):
        self.settings = settings
        hl, k = settings.history_len, settings.negatives
        drawn = rng.choice(len(probs), size=(interactions, hl + 1 + k), p=probs).astype(np.int64)
        self.samples = [ClickSample(row[:hl], int(row[hl]), row[hl + 1 :]) for row in drawn]

    def clicks(self) -> int:
        return len(self.samples)


@dataclass
class SyntheticWorkload:
    spec: SyntheticSpec
    scale: float
    settings: TrainSettings
    tokens: ItemTokens
    task: KnowledgeTracingTask | NewsTask
    probs: np.ndarray
    interactions: int  # paper sense (answers / clicks), after scaling
    occurrences_per_interaction: float

    def full_scale_factor(self) -> float:
        """Full-scale interactions / interactions actually generated."""
        return self.spec.interactions / self.interactions

    def expected_unique_items(self, interactions: float) -> float:
        return expected_unique(self.probs, interactions * self.occurrences_per_interaction)


def build_synthetic(
    spec: SyntheticSpec,
    settings: TrainSettings,
    scale: float,
    vocab_size: int,
    seed: int = 0,
    exponent: float = 1.0,
    max_items: int | None = None,
    max_tokens: int = MAX_TOKENS,
    mean_tokens: float | None = None,
) -> SyntheticWorkload:
    """Items, tokens and the task of one synthetic workload. max_items / mean_tokens shrink it (smoke tests)."""
    rng = np.random.default_rng([seed, sum(map(ord, spec.name))])
    num_items = min(spec.num_items, max_items) if max_items else spec.num_items
    probs = zipf_probabilities(num_items, exponent, rng)
    tokens = synthetic_tokens(num_items, mean_tokens or spec.mean_tokens, vocab_size, rng, max_tokens)
    interactions = max(1, math.ceil(spec.interactions * scale))
    if spec.task == "kt":
        task = SyntheticKTTask(settings, spec, probs, interactions, rng)
        per = 1.0
    else:
        task = SyntheticNewsTask(settings, spec, probs, interactions, rng)
        per = float(settings.history_len + 1 + settings.negatives)
    return SyntheticWorkload(spec, scale, settings, tokens, task, probs, interactions, per)
