"""The regression's batches: every touched item once a pass, and with length buckets, batches of like length."""

from __future__ import annotations

import copy

import pytest
import torch

from gramrec.trainer.distributed import World
from gramrec.trainer.regression import _shuffled_chunks
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens
from tests.helpers.gram_runs import kt_batches, make_run


def one_pass(items, tokens, batch_items, bucket_batches, seed=0, world=World()):
    generator = torch.Generator().manual_seed(seed)
    return list(_shuffled_chunks(items, tokens, batch_items, generator, world, bucket_batches))


def padded_tokens(batches, items, tokens) -> int:
    return sum(len(rows) * int(tokens.lengths[items[rows]].max()) for rows in batches)


@pytest.mark.parametrize("bucket_batches", [0, 1, 3, 100])
def test_every_item_comes_once_a_pass_each_batch_sorted(bucket_batches):
    tokens = random_tokens(300, max_len=30)
    items = torch.randperm(300)[:257]  # touched items, a last batch that is not full
    batches = one_pass(items, tokens, 16, bucket_batches)
    positions = torch.cat(batches)
    assert sorted(positions.tolist()) == list(range(len(items)))
    assert all(len(rows) <= 16 for rows in batches)
    for rows in batches:
        lengths = tokens.lengths[items[rows]]
        assert torch.equal(lengths, lengths.sort().values), "micro-batches need like lengths next to each other"


def test_length_buckets_pad_less_and_still_change_every_pass():
    tokens = random_tokens(2000, max_len=30)
    items = torch.arange(2000)
    random = one_pass(items, tokens, 32, 0)
    bucketed = one_pass(items, tokens, 32, 8)
    assert padded_tokens(bucketed, items, tokens) < 0.85 * padded_tokens(random, items, tokens)
    # The windows are drawn from a fresh shuffle each pass: which items share a batch changes.
    again = one_pass(items, tokens, 32, 8, seed=1)
    assert {tuple(sorted(r.tolist())) for r in bucketed} != {tuple(sorted(r.tolist())) for r in again}


def test_ranks_split_each_bucketed_batch():
    tokens = random_tokens(100, max_len=20)
    items = torch.arange(100)
    whole = one_pass(items, tokens, 10, 4)
    shares = [one_pass(items, tokens, 10, 4, world=World(rank=r, size=2)) for r in range(2)]
    for rows, first, second in zip(whole, *shares, strict=True):
        assert sorted(torch.cat([first, second]).tolist()) == sorted(rows.tolist())


def test_a_bucketed_regression_fits_like_a_random_one():
    """The setting reaches the regression, and on a tiny encoder it fits the moved rows as the default does."""
    for bucket_batches in (0, 2):
        run = make_run(GramMultiStep, "kt", "adam", period="100s", regress_lr=3e-3, regress_batch_size=4,
                       regress_fit=0.5, regress_max_passes=200, table_lr=1 / 32, progress=False,
                       regress_bucket_batches=bucket_batches)
        assert run.strategy._plan().bucket_batches == bucket_batches
        for batch in kt_batches(3):
            train_step(run, copy.deepcopy(batch))
        report = run.strategy.regress()
        assert report.stopped == "fit" and report.fit >= 0.5
