"""Multi-step GRAM's regression scales each pass to the length its rows ask for, and measures it in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from gramrec.trainer.regression import _line_search_scale
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import train_step
from tests.helpers.gram_runs import kt_batches, make_run

TOO_FAST = dict(period="100s", regress_lr=0.3, regress_batch_size=4, table_lr=1 / 32, progress=False)


def test_line_search_scale_is_the_least_squares_step_along_the_move():
    made = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    assert _line_search_scale(2 * made, made) == pytest.approx(2.0)
    assert _line_search_scale(0.25 * made + torch.tensor([[2.0, -1.0], [0.0, 0.0]]), made) == pytest.approx(0.25)
    assert _line_search_scale(-made, made) == 0.0, "a move away from the rows is no step at all"
    assert _line_search_scale(made, torch.zeros_like(made)) == 0.0


def moved_run(**settings):
    run = make_run(GramMultiStep, "kt", "adam", **settings)
    for batch in kt_batches(3):
        train_step(run, copy.deepcopy(batch))
    return run


def test_one_pass_far_too_fast_is_scaled_down_and_kept():
    """At a rate whose full pass raises the pseudo-loss, the line search shortens the pass's parameter move so the
    one pass lowers it."""
    unscaled = moved_run(regress_max_passes=1, regress_backtrack=False, regress_line_search=False, **TOO_FAST)
    assert unscaled.strategy.regress().fit < 0, "the full pass at this rate makes the fit worse"

    run = moved_run(regress_max_passes=1, **TOO_FAST)
    strategy = run.strategy
    touched = strategy.touched.nonzero().squeeze(1)
    targets = strategy.table[touched].clone()
    start = [p.detach().clone() for p in strategy.encoder.parameters()]
    report = strategy.regress()
    assert (report.passes, report.rejected) == (1, 0)
    assert 0 < report.scale < 1 and report.fit > 0
    after = float(0.5 * (targets - strategy._inference_encode(touched.cpu())).pow(2).sum())
    assert report.loss_after == pytest.approx(after, rel=1e-6), "the report measures the kept encoder"
    assert torch.equal(strategy.encoded[touched], strategy._inference_encode(touched.cpu())), "rows re-encoded"
    assert report.lr_next == 0.3 and strategy.regress_lr == 0.3, "a kept pass keeps the rate"
    moved = [p.detach() for p in strategy.encoder.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, moved))


def test_a_failed_regression_quarters_the_rate_of_the_next_and_the_rate_survives_a_checkpoint():
    run = moved_run(regress_max_passes=1, regress_lr=3e-4, **{k: v for k, v in TOO_FAST.items() if k != "regress_lr"})
    first = run.strategy.regress()
    assert first.rejected == 1, "at this rate the tiny encoder's pass points away from its rows (measured)"
    assert first.lr_next == pytest.approx(3e-4 / 4) and run.strategy._plan().lr == first.lr_next
    saved = run.strategy.state_tensors()
    fresh = make_run(GramMultiStep, "kt", "adam", regress_max_passes=1, **TOO_FAST)
    fresh.strategy.load_state_tensors(saved)
    assert fresh.strategy.regress_lr == first.lr_next
    older = {k: v for k, v in saved.items() if k != "regress_lr"}  # a checkpoint from before the carried rate
    fresh = make_run(GramMultiStep, "kt", "adam", regress_max_passes=1, **TOO_FAST)
    fresh.strategy.load_state_tensors(older)
    assert fresh.strategy.regress_lr == 0.3


def test_a_pass_that_cannot_help_leaves_the_encoder_and_table_exactly_as_they_were():
    run = moved_run(regress_max_passes=2, **TOO_FAST)
    strategy = run.strategy
    start = [p.detach().clone() for p in strategy.encoder.parameters()]
    encoded = strategy.encoded.clone()
    version = strategy.encoder_version
    strategy.deadline = 0.0  # long past: no step may run, so nothing can be kept
    report = strategy.regress()
    assert report.steps == 0 and report.scale == 0.0 and report.fit == 0.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(start, strategy.encoder.parameters()))
    assert torch.equal(strategy.encoded, encoded) and strategy.encoder_version == version


def test_decisions_are_measured_on_a_sample_of_the_touched_rows():
    run = moved_run(regress_max_passes=1, regress_check_items=3, **TOO_FAST)
    touched = int(run.strategy.touched.sum())
    assert touched > 3
    report = run.strategy.regress()
    assert (report.rows, report.check_rows) == (touched, 3)
