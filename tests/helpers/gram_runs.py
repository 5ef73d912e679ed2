"""Tiny float64 training runs of every strategy on generated batches (12 items that repeat), to compare updates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.models.news_head import NewsHead
from gramrec.trainer import kt_task, nr_task
from gramrec.trainer.graphed_step import StaticCFStep
from gramrec.trainer.kt_data import KTSequence
from gramrec.trainer.settings import TrainSettings
from tests.helpers.encoders import random_tokens, tiny_encoder

NUM_ITEMS = 12


def kt_batches(steps: int, seed: int = 0):
    """Batches of 3 students over 12 items: items repeat within and across students."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        rows = [
            KTSequence(f"u{b}", rng.integers(0, NUM_ITEMS, n), rng.integers(0, 2, n))
            for b, n in enumerate(rng.integers(3, 9, 3))
        ]
        out.append(kt_task.make_batch(rows))
    return out


def nr_batches(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        histories = [rng.integers(0, NUM_ITEMS, n) for n in rng.integers(0, 6, 3)]
        candidates = [rng.integers(0, NUM_ITEMS, 5) for _ in range(3)]
        out.append(nr_task.make_batch(histories, candidates))
    return out


TASKS = {
    "kt": (lambda dim: KnowledgeTracingHead(dim, hidden_dim=8, dropout=0.0), kt_task.KnowledgeTracingTask.loss_terms, kt_batches),
    "nr": (lambda dim: NewsHead(dim, num_heads=2, attention_dim=8, dropout=0.0), nr_task.NewsTask.loss_terms, nr_batches),
}

STATIC = {"kt": kt_task.KnowledgeTracingTask, "nr": nr_task.NewsTask}  # their static_caps / static_loss_terms


def make_run(strategy_cls, task: str, optimizer: str, period: str = "1s", pooling: str = "mean", **overrides):
    build_head, loss, _ = TASKS[task]
    settings = TrainSettings(**(dict(
        task=task, data=Path("unused"), strategy="gram", period=period, optimizer=optimizer,
        lr_cf=1e-2, lr_encoder=1e-2, warmup_steps=2, encoder_batch_size=5, regress_batch_size=10_000,
    ) | overrides))
    encoder = tiny_encoder(pooling)
    torch.manual_seed(1)
    head = build_head(encoder.dim).double()
    tokens = random_tokens(NUM_ITEMS)
    strategy = strategy_cls(encoder, tokens, head, settings, 10)
    task_class = STATIC[task]
    task_view = SimpleNamespace(loss_terms=loss, static_loss_terms=task_class.static_loss_terms,
                                static_caps=lambda: task_class.static_caps(SimpleNamespace(settings=settings)))
    static_step = StaticCFStep(strategy, task_view, settings.batch_size, torch.device("cpu"), encoder.dim) \
        if strategy.static_step else None
    return SimpleNamespace(device=torch.device("cpu"), strategy=strategy, head=head, encoder=encoder,
                           task=task_view, static_step=static_step)


def parameters(run) -> dict[str, torch.Tensor]:
    named = {f"encoder.{k}": v for k, v in run.encoder.named_parameters()}
    named |= {f"head.{k}": v for k, v in run.head.named_parameters()}
    return {k: v.detach().clone() for k, v in named.items()}


def max_relative_difference(a: dict, b: dict) -> float:
    """Max over tensors of max|a - b| / max|b|; tensors that are ~0 (zero-initialised biases) are measured
    against a millionth of the largest tensor instead of their own rounding noise."""
    floor = 1e-6 * max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), floor) for k in a)


def updates(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}
