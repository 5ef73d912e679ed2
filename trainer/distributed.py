"""Data-parallel training across processes (torchrun): each rank takes a shard of every global batch.

Why not wrap the modules in DistributedDataParallel: GRAM runs the encoder outside the loss graph (on unique
items, then `h.backward(dL/dh)`), several forward calls per step, which DDP's reducer does not expect. Instead
every rank back-propagates its shard's loss, normalised by the GLOBAL number of targets, and the gradients are
summed across ranks before each optimizer step: the same update as one process on the whole global batch.
Each rank encodes only the unique items of its own shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def init_from_env(device: torch.device) -> World:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); a lone process is World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def global_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """All-reduces (sums) the gradients of `params` in one flat buffer; a missing gradient counts as zero."""
    if not world.is_distributed or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param, grad in zip(params, grads):
        numel = grad.numel()
        param.grad = flat[offset : offset + numel].view_as(param).clone()
        offset += numel


def agree(value: float, world: World) -> float:
    """Rank 0's value on every rank, so decisions taken from it (early stopping, time budget) cannot diverge."""
    if not world.is_distributed:
        return value
    shared = torch.tensor([value if world.is_main else 0.0], dtype=torch.float64)
    dist.all_reduce(shared, op=dist.ReduceOp.SUM)
    return float(shared.item())


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def all_gather_rows(rows: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows [K_r, ...] concatenated in rank order; ranks may hold different K_r."""
    if not world.is_distributed:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])


def shard_rows(rows: list, world: World) -> list:
    """This rank's rows of a global batch: every size-th row, starting at the rank."""
    return rows[world.rank :: world.size]
