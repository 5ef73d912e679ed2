"""GRAM-1S must give exactly the E2E update, and run the encoder once per unique item instead of per interaction."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.models.news_head import NewsHead
from gramrec.trainer import kt_task, nr_task
from gramrec.trainer.kt_data import KTSequence
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.strategies import EndToEnd, GramMultiStep, GramSingleStep
from gramrec.trainer.train import train_step
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


def make_run(strategy_cls, task: str, optimizer: str, period: str = "1s", pooling: str = "mean", **overrides):
    build_head, loss, _ = TASKS[task]
    settings = TrainSettings(
        task=task, data=Path("unused"), strategy="gram", period=period, optimizer=optimizer,
        lr_cf=1e-2, lr_encoder=1e-2, warmup_steps=2, encoder_batch_size=5, regress_batch_size=10_000, **overrides,
    )
    encoder = tiny_encoder(pooling)
    torch.manual_seed(1)
    head = build_head(encoder.dim).double()
    tokens = random_tokens(NUM_ITEMS)
    strategy = strategy_cls(encoder, tokens, head, settings, 10)
    return SimpleNamespace(device=torch.device("cpu"), strategy=strategy, head=head, encoder=encoder,
                           task=SimpleNamespace(loss_terms=loss))


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


@pytest.mark.parametrize("task", ["kt", "nr"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_single_step_gram_equals_e2e(task, optimizer, pooling):
    e2e = make_run(EndToEnd, task, optimizer, pooling=pooling)
    gram = make_run(GramSingleStep, task, optimizer, pooling=pooling)
    start = parameters(e2e)
    assert max_relative_difference(parameters(gram), start) == 0.0
    batches = TASKS[task][2](5)

    train_step(e2e, copy.deepcopy(batches[0]))
    train_step(gram, copy.deepcopy(batches[0]))
    e2e_update, gram_update = updates(parameters(e2e), start), updates(parameters(gram), start)
    scale = max(float(v.abs().max()) for v in e2e_update.values())
    moved = [k for k, v in e2e_update.items() if v.abs().max() > 1e-6 * scale]
    assert any(k.startswith("encoder.backbone") for k in moved), "the encoder must learn from the CF loss"
    assert any(k.startswith("head.") for k in moved)
    # The gradient of an attention key bias is exactly zero (softmax ignores a shift shared by all keys), so
    # both runs see rounding noise there (~1e-24) that Adam rescales: those updates must only be ~0 in both.
    zero_grad = [k for k in e2e_update if k.endswith("attention.self.key.bias")]
    assert all(max(float(gram_update[k].abs().max()), float(e2e_update[k].abs().max())) < 1e-9 * scale for k in zero_grad)
    real = [k for k in e2e_update if k not in zero_grad]
    assert max_relative_difference({k: gram_update[k] for k in real}, {k: e2e_update[k] for k in real}) < 1e-9

    for batch in batches[1:]:
        train_step(e2e, copy.deepcopy(batch))
        train_step(gram, copy.deepcopy(batch))
    assert max_relative_difference(parameters(gram), parameters(e2e)) < 1e-6
    assert max_relative_difference(parameters(gram), start) > 1e-4, "five steps must have moved the parameters"


@pytest.mark.parametrize("task", ["kt", "nr"])
def test_encoder_passes_unique_items_vs_interactions(task):
    batch = TASKS[task][2](1)[0]
    interactions = len(batch.occurrences)
    unique = len(torch.unique(batch.occurrences))
    assert unique < interactions, "the test batch must repeat items"
    e2e = make_run(EndToEnd, task, "adam")
    gram = make_run(GramSingleStep, task, "adam")
    train_step(e2e, copy.deepcopy(batch))
    train_step(gram, copy.deepcopy(batch))
    assert (e2e.encoder.items_forward, e2e.encoder.items_backward) == (interactions, interactions)
    assert (gram.encoder.items_forward, gram.encoder.items_backward) == (unique, unique)


@pytest.mark.parametrize("task", ["kt", "nr"])
def test_multi_step_gram_with_period_one_follows_single_step(task):
    """With period 1 the table is re-encoded, moved by -dL/dh and regressed onto: the 1S pseudo-target."""
    one = make_run(GramSingleStep, task, "sgd")
    multi = make_run(GramMultiStep, task, "sgd", period="1s")
    assert isinstance(multi.strategy, GramMultiStep) and multi.strategy.period_steps == 1
    for batch in TASKS[task][2](3):
        train_step(one, copy.deepcopy(batch))
        train_step(multi, copy.deepcopy(batch))
    assert max_relative_difference(parameters(multi), parameters(one)) < 1e-9


def test_multi_step_gram_table_sgd_and_regression_schedule():
    run = make_run(GramMultiStep, "kt", "adam", period="3s")
    strategy = run.strategy
    initial = strategy.table.clone()
    batches = kt_batches(6)
    forward_before = run.encoder.items_forward
    train_step(run, copy.deepcopy(batches[0]))
    used = torch.unique(batches[0].occurrences)
    unused = torch.tensor(sorted(set(range(NUM_ITEMS)) - set(used.tolist())), dtype=torch.long)
    assert strategy.touched[used].all() and not strategy.touched[unused].any()
    assert not torch.equal(strategy.table[used], initial[used]), "touched rows move by SGD"
    assert torch.equal(strategy.table[unused], initial[unused])
    assert run.encoder.items_backward == 0 and run.encoder.items_forward == forward_before, "no encoder pass yet"
    train_step(run, copy.deepcopy(batches[1]))
    train_step(run, copy.deepcopy(batches[2]))
    touched = int(strategy.touched.sum()) if strategy.regressions == 0 else None
    assert strategy.regressions == 1 and touched is None
    assert run.encoder.items_backward == len(
        torch.unique(torch.cat([b.occurrences for b in batches[:3]]))
    ), "the regression runs the encoder once per item touched in the period"
    assert not strategy.touched.any()
