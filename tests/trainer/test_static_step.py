"""The static-shape (graphed) CF step: padding changes nothing, and its updates equal the eager step's.

On a CPU the graphed step runs its padded body eagerly, so these tests check everything but the capture itself;
bench/train_bench.py checks graphed against eager on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.static_batches import bucket, pad_batch, pad_occurrences
from gramrec.trainer.strategies import EndToEnd, GramMultiStep, GramSingleStep, NoFinetune
from gramrec.trainer.train import train_step
from tests.helpers.gram_runs import NUM_ITEMS, STATIC, TASKS, make_run, max_relative_difference, parameters

CAPS = {"kt": (100,), "nr": (50, 5)}


def test_buckets_are_a_quarter_half_or_all_of_the_cap():
    assert [bucket(n, 50) for n in (0, 1, 13, 14, 25, 26, 50)] == [13, 13, 13, 25, 25, 50, 50]
    assert bucket(51, 50) == 64  # past the cap: a power of two
    with pytest.raises(ValueError, match="without item occurrences"):
        pad_occurrences(torch.zeros(0, dtype=torch.long), 4)


def loss_and_gradients(head, table, batch, loss_terms):
    head.zero_grad(set_to_none=True)
    table.grad = None
    embeddings = torch.cat([table[batch.occurrences], table.new_zeros(1, table.shape[1])])
    total, count = loss_terms(head, embeddings, batch)
    loss = total / count.to(total.dtype)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()} | {"table": table.grad.clone()}
    return loss.detach(), grads


@pytest.mark.parametrize("task", ["kt", "nr"])
def test_a_padded_batch_gives_the_same_loss_and_gradients(task):
    build_head, loss_terms, make_batches = TASKS[task]
    torch.manual_seed(0)
    table = torch.randn(NUM_ITEMS, 16, dtype=torch.float64, requires_grad=True)
    head = build_head(16).double()
    for batch in make_batches(4):
        static = pad_batch(batch, 8, CAPS[task])
        assert static.key[0] == 8 and all(w in (25, 50, 100) or w in (13, 2, 3, 5) for w in static.key[1])
        assert static.real == len(batch.occurrences) < len(static.batch.occurrences)
        loss, grads = loss_and_gradients(head, table, batch, loss_terms)
        padded_loss, padded_grads = loss_and_gradients(head, table, static.batch, STATIC[task].static_loss_terms)
        assert float(loss) > 0 and abs(float(padded_loss - loss)) <= 1e-12 * float(loss)
        assert float(grads["table"].abs().max()) > 0
        assert max_relative_difference(padded_grads, grads) < 1e-10


STRATEGIES = {"e2e": (EndToEnd, "1s"), "gram-1s": (GramSingleStep, "1s"), "gram-2s": (GramMultiStep, "2s"),
              "nofinetune": (NoFinetune, "1s")}


@pytest.mark.parametrize("task", ["kt", "nr"])
@pytest.mark.parametrize("label", list(STRATEGIES))
def test_the_static_step_makes_the_eager_steps_updates(task, label):
    strategy_cls, period = STRATEGIES[label]
    eager = make_run(strategy_cls, task, "adam", period=period, cf_step="eager", batch_size=4)
    static = make_run(strategy_cls, task, "adam", period=period, cf_step="graphed", batch_size=4)
    assert eager.static_step is None and static.static_step is not None
    start = parameters(eager)
    for batch in TASKS[task][2](5):
        loss = train_step(eager, copy.deepcopy(batch))
        static_loss = train_step(static, copy.deepcopy(batch))
        assert abs(float(static_loss - loss)) <= 1e-10 * abs(float(loss))
    after, reference = parameters(static), parameters(eager)
    # An attention key bias has exactly zero gradient (softmax ignores a shift shared by all keys): both runs see
    # rounding noise there, which Adam rescales; it must agree to a millionth of the largest weight, the rest to 1e-9.
    noise = [k for k in after if k.endswith("attention.self.key.bias")]
    scale = max(float(v.abs().max()) for v in reference.values())
    assert all(float((after[k] - reference[k]).abs().max()) < 1e-6 * scale for k in noise)
    assert max_relative_difference({k: v for k, v in after.items() if k not in noise}, reference) < 1e-9
    assert max_relative_difference(after, start) > 1e-4, "five steps must have moved the parameters"
    if isinstance(eager.strategy, GramMultiStep):
        assert eager.strategy.regressions == static.strategy.regressions == 2
        assert torch.equal(eager.strategy.touched, static.strategy.touched)
        assert float((static.strategy.table - eager.strategy.table).abs().max()) < 1e-9


def test_auto_is_eager_on_a_cpu():
    run = make_run(NoFinetune, "kt", "adam", cf_step="auto")
    assert run.static_step is None
    assert TrainSettings(task="kt", data="x").cf_step == "auto"


@pytest.mark.parametrize("count", [1, 16, 17, 150])
def test_streaming_an_epoch_prepares_every_batch_once_in_order(count):
    """stream() prepares in chunks as the loop reaches them; it must hand out exactly what prepare() does."""
    run = make_run(NoFinetune, "kt", "adam", cf_step="graphed", batch_size=4)
    batches = TASKS["kt"][2](count)
    streamed = list(run.static_step.stream(batches))
    prepared = run.static_step.prepare(batches)
    assert len(streamed) == len(prepared) == count
    for a, b in zip(streamed, prepared):
        assert a.key == b.key and a.real == b.real
        assert torch.equal(a.batch.occurrences, b.batch.occurrences)
