"""Two gloo processes on one global batch make the same update as one process on all of it."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from gramrec.trainer import kt_task, nr_task
from gramrec.trainer.distributed import SINGLE, World
from gramrec.trainer.kt_data import KTSequence
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.strategies import make_strategy
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens, tiny_encoder
from tests.helpers.gram_runs import (
    NUM_ITEMS,
    TASKS,
    max_relative_difference,
    parameters,
)

STEPS = 3


def global_rows(task: str, step: int):
    """One global batch of 6 rows (students or click samples) in which items repeat within and across rows."""
    rng = np.random.default_rng(step)
    if task == "kt":
        return [KTSequence(f"u{b}", rng.integers(0, NUM_ITEMS, n), rng.integers(0, 2, n)) for b, n in
                enumerate(rng.integers(3, 9, 6))]
    return [(rng.integers(0, NUM_ITEMS, n), rng.integers(0, NUM_ITEMS, 5)) for n in rng.integers(0, 6, 6)]


def shard_batch(task: str, rows: list, world: World):
    rows = rows[world.rank :: world.size]
    if task == "kt":
        return kt_task.make_batch(rows)
    return nr_task.make_batch([h for h, _ in rows], [c for _, c in rows])


def build(task: str, strategy: str, world: World):
    """strategy: "e2e", "gram" (1S) or "gram-2s" (multi-step, a regression every 2 steps, 3 items per Adam step)."""
    build_head, loss_terms, _ = TASKS[task]
    name, _, period = strategy.partition("-")
    settings = TrainSettings(task=task, data=Path("unused"), strategy=name, period=period or "1s", lr_cf=1e-2,
                             lr_encoder=1e-2, warmup_steps=1, encoder_batch_size=5, regress_batch_size=3)
    encoder = tiny_encoder()
    torch.manual_seed(1)
    head = build_head(encoder.dim).double()
    strategy_obj = make_strategy(encoder, random_tokens(NUM_ITEMS), head, settings, 10, world)
    return SimpleNamespace(device=torch.device("cpu"), strategy=strategy_obj, head=head, encoder=encoder,
                           task=SimpleNamespace(loss_terms=loss_terms), static_step=None)  # eager under torchrun


def train_steps(task: str, strategy: str, world: World):
    run = build(task, strategy, world)
    for step in range(STEPS):
        train_step(run, shard_batch(task, global_rows(task, step), world), world)
    return run


def worker(rank: int, port: int, task: str, strategy: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run = train_steps(task, strategy, World(rank=rank, size=2))
        state = parameters(run) | {f"strategy.{k}": v for k, v in run.strategy.state_tensors().items()}
        save_file(state, f"{out}/rank{rank}.safetensors")
        save_file({"forward": torch.tensor(run.encoder.items_forward)}, f"{out}/count{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("task", ["kt", "nr"])
@pytest.mark.parametrize("strategy", ["gram", "e2e", "gram-2s"])
def test_two_process_update_equals_one_process_update(tmp_path, task, strategy):
    mp.spawn(worker, args=(free_port(), task, strategy, str(tmp_path)), nprocs=2, join=True)
    single_run = train_steps(task, strategy, SINGLE)
    single = parameters(single_run)
    for rank in (0, 1):
        ranked = load_file(tmp_path / f"rank{rank}.safetensors")
        if strategy == "gram-2s":
            assert single_run.strategy.regressions == 1
            # The item table (SGD-updated rows, refreshed rows) is the same on every rank as in one process.
            torch.testing.assert_close(ranked["strategy.table"], single_run.strategy.table, rtol=1e-9, atol=1e-12)
            assert torch.equal(ranked["strategy.touched"], single_run.strategy.touched)
        # Key-bias gradients are exactly zero (rounding noise only): compare every other parameter tightly.
        real = [k for k in single if not k.endswith("attention.self.key.bias")]
        assert max_relative_difference({k: ranked[k] for k in real}, {k: single[k] for k in real}) < 1e-9
    if strategy == "gram":
        # Each rank encodes only the unique items of its own shard.
        per_rank = [int(load_file(tmp_path / f"count{r}.safetensors")["forward"]) for r in (0, 1)]
        expected = [sum(len(torch.unique(shard_batch(task, global_rows(task, s), World(r, 2)).occurrences))
                        for s in range(STEPS)) for r in (0, 1)]
        assert per_rank == expected


