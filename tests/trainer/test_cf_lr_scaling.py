"""Larger CF batches with a learning-rate rule (TrainSettings.cf_lr_scaling): the rule's arithmetic, and runs that
really train with the scaled rates while the table step stays on the summed loss."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import build_run, train, train_step
from tests.helpers.gram_runs import kt_batches, make_run, max_relative_difference, parameters


def settings(**overrides) -> TrainSettings:
    return TrainSettings(**({"task": "nr", "data": Path("x"), "lr_cf": 1e-3, "warmup_steps": 50} | overrides))


@pytest.mark.parametrize(
    "batch, rule, factor, warmup",
    [
        (32, "none", 1.0, 50),
        (32, "sqrt", 1.0, 50),
        (32, "linear", 1.0, 50),
        (128, "none", 1.0, 50),  # the default: rates as given at any batch
        (128, "sqrt", 2.0, 13),  # 50 x 32 / 128 = 12.5 steps, rounded up
        (128, "linear", 4.0, 13),
        (512, "sqrt", 4.0, 4),
        (512, "linear", 16.0, 4),
        (8, "sqrt", 0.5, 200),
    ],
)
def test_the_rule_scales_the_cf_rate_and_counts_warm_up_in_samples(batch, rule, factor, warmup):
    s = settings(batch_size=batch, cf_lr_scaling=rule)
    assert s.cf_lr_factor == pytest.approx(factor)
    assert s.cf_lr == pytest.approx(1e-3 * factor)
    assert s.cf_warmup_steps == warmup


def test_the_reference_batch_and_the_defaults():
    assert settings().cf_lr_scaling == "none" and settings().cf_lr_reference_batch == 32
    assert settings(batch_size=128, cf_lr_scaling="sqrt", cf_lr_reference_batch=128).cf_lr_factor == 1.0
    assert settings(batch_size=32, cf_lr_scaling="sqrt", cf_lr_reference_batch=8).cf_lr_factor == pytest.approx(2.0)
    assert math.isclose(settings(batch_size=96, cf_lr_scaling="sqrt").cf_lr_factor, math.sqrt(3))
    with pytest.raises(ValueError):
        settings(cf_lr_scaling="cubic")
    with pytest.raises(ValueError):
        settings(cf_lr_reference_batch=0)


def test_a_scaled_rate_is_the_same_run_as_that_rate_given_by_hand():
    """Batch 128 under sqrt trains the head exactly as lr_cf x 2 with no rule (warm-up off in both), and the table
    step is table_lr on the summed loss in both (table_lr x batch on the mean), untouched by the rule."""
    common = dict(period="100s", batch_size=128, warmup_steps=0)
    ruled = make_run(GramMultiStep, "kt", "adam", cf_lr_scaling="sqrt", **common)
    by_hand = make_run(GramMultiStep, "kt", "adam", lr_cf=2e-2, **common)  # make_run's lr_cf is 1e-2
    unscaled = make_run(GramMultiStep, "kt", "adam", **common)
    assert ruled.strategy.table_lr == by_hand.strategy.table_lr == ruled.strategy.settings.table_lr * 128
    for batch in kt_batches(3):
        for run in (ruled, by_hand, unscaled):
            train_step(run, copy.deepcopy(batch))
    assert max_relative_difference(parameters(ruled), parameters(by_hand)) < 1e-12
    assert max_relative_difference(parameters(ruled), parameters(unscaled)) > 1e-3


def test_multi_step_gram_trains_at_batch_128_with_sqrt_scaling(shared_data, tmp_path, tiny_encoder_dir):
    s = TrainSettings(task="kt", data=shared_data / "codeworkout_s19", out=tmp_path, encoder_dir=tiny_encoder_dir,
                      strategy="gram", period="1e", batch_size=128, cf_lr_scaling="sqrt", lr_cf=1e-3,
                      warmup_steps=8, epochs=1, max_tokens=64, hidden_dim=32, max_seq_len=50, progress=False)
    run = build_run(s)
    optimizer, scheduler = run.strategy.optimizers["cf"]
    assert scheduler.base_lrs == [pytest.approx(2e-3)]
    batches = run.task.train_batches(np.random.default_rng(0))[:2]
    for batch in batches:
        assert float(train_step(run, batch)) > 0
    # Warm-up of 8 steps at batch 32 = 2 at batch 128: after 2 steps the head is at its full, scaled rate.
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(2e-3)
    report = train(s)
    assert math.isfinite(report["best_val"]) and report["settings"]["cf_lr_scaling"] == "sqrt"
