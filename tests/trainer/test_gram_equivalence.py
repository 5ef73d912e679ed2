"""GRAM-1S must give exactly the E2E update, and run the encoder once per unique item instead of per interaction."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.strategies import EndToEnd, GramMultiStep, GramSingleStep, NoFinetune
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens, tiny_encoder
from tests.helpers.gram_runs import (
    NUM_ITEMS,
    TASKS,
    kt_batches,
    make_run,
    max_relative_difference,
    parameters,
    updates,
)


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


# The settings under which one regression is exactly one 1S encoder step: a table step of lr 1 on the mean loss
# (so the residual is -dL/dh), one pass of one optimizer step over all touched rows, at the 1S learning rate, kept
# whatever it does to the fit and at its full length (no line search).
AS_SINGLE_STEP = dict(table_lr=1 / 32, batch_size=32, regress_max_passes=1, regress_backtrack=False,
                      regress_line_search=False, regress_lr=1e-2, warmup_steps=0)


@pytest.mark.parametrize("task", ["kt", "nr"])
def test_multi_step_gram_with_period_one_and_one_pass_is_single_step(task):
    """Period 1, table_lr 1 and one regression pass reduce multi-step GRAM to 1S: the re-encoded table is moved
    by -dL/dh and regressed onto, the 1S pseudo-target. (Its defaults differ by design: a table step of the batch
    size, and a line search that scales each regression pass's move.)"""
    one = make_run(GramSingleStep, task, "sgd", **AS_SINGLE_STEP)
    multi = make_run(GramMultiStep, task, "sgd", period="1s", **AS_SINGLE_STEP)
    assert isinstance(multi.strategy, GramMultiStep) and multi.strategy.period_steps == 1
    for batch in TASKS[task][2](3):
        train_step(one, copy.deepcopy(batch))
        train_step(multi, copy.deepcopy(batch))
    assert max_relative_difference(parameters(multi), parameters(one)) < 1e-9
    assert [r.steps for r in multi.strategy.reports] == [1, 1, 1]


def test_table_step_is_table_lr_on_the_loss_summed_over_the_batch_users():
    """Hand-computed: the row step is -table_lr * B * d(mean loss)/d(row) = -table_lr * d(sum over users)/d(row),
    repeated items' gradients summed; the defaults are per task."""
    run = make_run(GramMultiStep, "kt", "sgd", period="100s", batch_size=3, table_lr=0.5)
    strategy = run.strategy
    assert strategy.table_lr == 1.5
    batch = kt_batches(1)[0]  # 3 students
    before = strategy.table.clone()
    embeddings = strategy.embed(batch.occurrences)
    leaf = strategy._leaf
    total, count = run.task.loss_terms(run.head, torch.cat([embeddings, embeddings.new_zeros(1, embeddings.shape[1])]),
                                       batch)
    (total / count).backward()
    mean_gradient = leaf.grad.clone()  # [U, D] d(mean loss)/d(row)
    unique = torch.unique(batch.occurrences)
    strategy.finish_step()
    step = strategy.table[unique] - before[unique]
    assert torch.allclose(step, -0.5 * 3 * mean_gradient, rtol=1e-12, atol=1e-15)
    assert float(step.abs().max()) > 0
    assert TrainSettings(task="kt", data=Path("x")).table_lr == 16.0
    assert TrainSettings(task="nr", data=Path("x")).table_lr == 0.25


def moved_kt_rows() -> tuple[GramMultiStep, torch.Tensor]:
    """A KT multi-step GRAM run after 3 CF steps with no regression yet (one to fit half its pseudo-loss, in up to
    200 passes), and the rows those steps touched."""
    run = make_run(GramMultiStep, "kt", "adam", period="100s", regress_lr=3e-3, regress_batch_size=4,
                   regress_fit=0.5, regress_max_passes=200, table_lr=1 / 32, progress=False)
    for batch in kt_batches(3):
        train_step(run, copy.deepcopy(batch))
    return run.strategy, run.strategy.touched.nonzero().squeeze(1)


def test_regression_removes_the_documented_share_of_its_pseudo_loss():
    """On a tiny encoder, one regression onto moved rows removes at least regress_fit of the pseudo-loss, and
    the report's numbers agree with a direct measurement."""
    strategy, touched = moved_kt_rows()
    targets = strategy.table[touched].clone()
    before = float(0.5 * (targets - strategy.encoded[touched]).pow(2).sum())
    assert before > 0
    report = strategy.regress()
    after = float(0.5 * (targets - strategy._inference_encode(touched.cpu())).pow(2).sum())
    assert report.loss_before == pytest.approx(before, rel=1e-9)
    assert report.loss_after == pytest.approx(after, rel=1e-9)
    assert report.stopped == "fit" and report.fit >= 0.5 and 1 - after / before >= 0.5
    assert report.passes > 1, "a single pass of Adam steps is not enough here: the loop must go on"
    assert 0 < report.toward and report.cosine > 0.5 and report.param_change > 0
    assert torch.equal(strategy.table[touched], strategy.encoded[touched]), "touched rows are re-encoded"


def test_regression_undoes_a_pass_that_worsens_its_fit():
    """At a learning rate far too large for targets this near, a full-length pass (no line search) raises the
    pseudo-loss: it is undone and retried at a quarter of the rate, so the regression ends no worse than it began, and usually better."""
    run = make_run(GramMultiStep, "kt", "adam", period="100s", regress_lr=0.3, regress_batch_size=4,
                   regress_max_passes=12, regress_line_search=False, table_lr=1 / 32, progress=False)
    for batch in kt_batches(3):
        train_step(run, copy.deepcopy(batch))
    report = run.strategy.regress()
    assert report.rejected >= 1 and report.loss_after <= report.loss_before
    assert report.fit > 0, "a gentler retry must have found a pass that helps"
    unguarded = make_run(GramMultiStep, "kt", "adam", period="100s", regress_lr=0.3, regress_batch_size=4,
                         regress_max_passes=1, regress_backtrack=False, regress_line_search=False, table_lr=1 / 32,
                         progress=False)
    for batch in kt_batches(3):
        train_step(unguarded, copy.deepcopy(batch))
    assert unguarded.strategy.regress().fit < 0, "the same rate without backtracking makes the fit worse"


def test_regression_stops_at_its_pass_cap_and_its_deadline():
    run = make_run(GramMultiStep, "kt", "adam", period="100s", regress_lr=1e-6, regress_batch_size=4,
                   regress_max_passes=3, progress=False)
    for batch in kt_batches(2):
        train_step(run, copy.deepcopy(batch))
    report = run.strategy.regress()
    assert (report.stopped, report.passes) == ("passes", 3)
    for batch in kt_batches(2, seed=1):
        train_step(run, copy.deepcopy(batch))
    run.strategy.deadline = 0.0  # long past: the regression must not start a step
    report = run.strategy.regress()
    assert (report.stopped, report.steps) == ("time", 0)


def test_evaluation_scores_current_encodings_not_moved_rows():
    """Between regressions the table's touched rows are SGD-moved; evaluation and export must both see what the
    encoder computes, so item_table gives the encodings."""
    run = make_run(GramMultiStep, "kt", "adam", period="100s")
    train_step(run, copy.deepcopy(kt_batches(1)[0]))
    strategy = run.strategy
    touched = strategy.touched.nonzero().squeeze(1)
    table = strategy.item_table(torch.arange(NUM_ITEMS))
    assert not torch.allclose(strategy.table[touched], table[touched]), "the rows did move"
    assert torch.allclose(table, strategy._inference_encode(torch.arange(NUM_ITEMS)), rtol=1e-12, atol=1e-14)


def test_multi_step_gram_table_sgd_and_regression_schedule():
    run = make_run(GramMultiStep, "kt", "adam", period="3s", regress_max_passes=1)
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
    assert strategy.regressions == 1 and len(strategy.reports) == 1
    assert run.encoder.items_backward == len(
        torch.unique(torch.cat([b.occurrences for b in batches[:3]]))
    ), "one regression pass runs the encoder backward once per item touched in the period"
    assert not strategy.touched.any()


def test_period_in_epochs_regresses_at_the_end_of_each_epoch():
    """0.5e over a 5-step epoch regresses after step 3 and again at the epoch's end, before evaluation."""
    run = make_run(GramMultiStep, "kt", "adam", period="0.5e", regress_max_passes=1)
    strategy = run.strategy
    strategy.steps_per_epoch = 5
    strategy.period_steps = strategy.period.steps(5)
    for batch in kt_batches(5):
        train_step(run, copy.deepcopy(batch))
    assert strategy.regressions == 1
    strategy.end_epoch()
    assert strategy.regressions == 2 and not strategy.touched.any()
    strategy.end_epoch()  # nothing touched since: no empty regression
    assert strategy.regressions == 2


@pytest.mark.parametrize("strategy_cls,train_mode", [(EndToEnd, True), (GramSingleStep, True),
                                                     (GramMultiStep, False), (NoFinetune, False)])
def test_encoder_mode_is_set_by_the_strategy_not_by_call_order(strategy_cls, train_mode):
    """Dropout on from the first step for E2E and 1S (and staying on after an inference encode); off for the
    strategies that only encode (multi-step GRAM also regresses in eval mode)."""
    settings = TrainSettings(task="kt", data=Path("unused"), strategy="gram", period="1s", encoder_batch_size=5)
    encoder = tiny_encoder(dropout=0.1)
    encoder.backbone.eval()  # as from_pretrained returns it, while ContentEncoder.training is True
    head = KnowledgeTracingHead(encoder.dim, hidden_dim=8, dropout=0.0).double()
    strategy = strategy_cls(encoder, random_tokens(NUM_ITEMS), head, settings, 10)
    dropouts = [m for m in encoder.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training == train_mode for m in dropouts)
    strategy._inference_encode(torch.arange(3))
    assert all(m.training == train_mode for m in dropouts)
    assert head.training


def test_a_regression_re_encodes_its_rows_in_chunks_into_both_tables(monkeypatch):
    """The touched rows are re-encoded a chunk at a time straight into the tables (no [K, D] output alive at once):
    with chunks of 2 rows every touched row ends equal to a whole encode of them, and no other row changes."""
    from gramrec.trainer import strategies

    monkeypatch.setattr(strategies, "REENCODE_CHUNK", 2)
    strategy, touched = moved_kt_rows()
    assert len(touched) > 2 * 2, "several chunks"
    others = torch.ones(strategy.num_items, dtype=torch.bool)
    others[touched] = False
    untouched_rows = strategy.table[others].clone()
    assert strategy.regress().fit > 0, "a pass was kept: the rows are re-encoded"
    whole = strategy._inference_encode(touched.cpu())
    assert torch.allclose(strategy.encoded[touched], whole, rtol=1e-12, atol=1e-14)
    assert torch.equal(strategy.table[touched], strategy.encoded[touched])
    assert bool((strategy.row_version[touched] == strategy.encoder_version).all()) and strategy.encoder_version == 1
    assert torch.equal(strategy.table[others], untouched_rows)
