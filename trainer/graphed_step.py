"""The CF step without per-step host overhead: static shapes, CUDA graphs, the epoch's batches on the GPU.

The CF heads do a few MFLOP a step, so an eager step is nearly all kernel launches and Python. Here every batch
is padded to one of a few bucketed shapes (trainer/static_batches.py) and, per shape, the whole step (the table
gather, the head's forward and backward, the CF optimizer's step and multi-step GRAM's table update) is captured
once as a CUDA graph and then replayed. Encoder strategies (E2E, GRAM-1S) run the encoder eagerly around the
graph: their embeddings are copied into the graph's input, and the graph hands back d(loss)/d(embeddings) for the
encoder's backward. On a CPU the same padded step runs eagerly (what the CPU tests compare with the reference).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gramrec.trainer.cuda_graphs import WARMUP_CALLS, CapturedGraphs, on_side_stream
from gramrec.trainer.static_batches import StaticBatch, pad_batch
from gramrec.trainer.strategies import Strategy

# Batches padded and queued to the device at a time by `stream`: a small first chunk so the GPU starts at once,
# then large ones. The graphed loop is GPU-bound (on an H200 the host's share of a step, ~0.3 ms, runs ahead of the
# graph's ~0.5 ms: bench/cf_loop_probe.py), so a chunk prepared while earlier steps still run costs no wall time;
# an epoch prepared before its loop cost 0.15-0.2 ms a step of idle GPU, and chunks of 32 cost 0.32 ms a step of
# host time (each chunk's pinned buffers are new while the GPU still reads the last ones): BENCHMARKS.md §3.
PREPARE_CHUNKS = (16, 128)


def tensors_of(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) batch dataclass, in field order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]


def with_tensors(obj, tensors: Iterator[torch.Tensor]):
    """A copy of a (nested) batch dataclass holding the next tensors of `tensors`, in field order."""
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    return dataclasses.replace(
        obj, **{f.name: with_tensors(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}
    )


@dataclass
class _Shape:
    """One bucketed shape: its static input buffers, its captured graph and the graph's loss output."""

    inputs: StaticBatch
    embeddings: torch.Tensor  # [I, D] occurrence embeddings the loss reads (a leaf when row gradients are wanted)
    input_tensors: list[torch.Tensor]  # inputs' tensors, in field order
    eager_steps: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None


class StaticCFStep(CapturedGraphs):
    """Runs training steps on padded batches; on CUDA each shape is captured once and replayed."""

    graphs_name = "CF step graphs"

    def __init__(self, strategy: Strategy, task, batch_size: int, device: torch.device, dim: int):
        super().__init__(device)
        self.strategy = strategy
        self.head: nn.Module = strategy.head
        self.task = task
        self.rows = batch_size
        self.caps = task.static_caps()
        self.dim = dim
        self.optimizer, self.scheduler = strategy.optimizers["cf"]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            probe = strategy.static_rows(torch.zeros(1, dtype=torch.long, device=device))
        self.embeds_in_graph = probe is not None  # table strategies; encoder strategies embed outside the graph
        self.shapes: dict[tuple, _Shape] = {}
        self.prepare_s = 0.0  # seconds spent padding batches and queueing their copies to the device
        self.pad_s = 0.0  # of which padding
        self._armed = False

    # -- batches ------------------------------------------------------------------------------------------
    def prepare(self, batches: list) -> list[StaticBatch]:
        """Pads an epoch's batches and moves them to the device before the loop: one pinned, asynchronous copy
        per shape and tensor field, so the loop itself copies nothing from the host."""
        started = time.perf_counter()
        padded = [pad_batch(batch, self.rows, self.caps) for batch in batches]
        self.pad_s += time.perf_counter() - started
        if self.device.type != "cuda":
            self.prepare_s += time.perf_counter() - started
            return padded
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(padded):
            groups.setdefault(p.key, []).append(i)
        out: list[StaticBatch | None] = [None] * len(padded)
        for indices in groups.values():
            columns = zip(*(tensors_of(padded[i].batch) for i in indices), strict=True)
            moved = [torch.stack(c).pin_memory().to(self.device, non_blocking=True).unbind(0) for c in columns]
            for row, i in enumerate(indices):
                batch = with_tensors(padded[i].batch, iter([m[row] for m in moved]))
                out[i] = dataclasses.replace(padded[i], batch=batch)
        self.prepare_s += time.perf_counter() - started
        return [p for p in out if p is not None]

    def stream(self, batches: list) -> Iterator[StaticBatch]:
        """The epoch's batches, prepared a chunk at a time as the loop reaches them (see PREPARE_CHUNKS)."""
        first, rest = PREPARE_CHUNKS
        yield from self.prepare(batches[:first])
        for start in range(first, len(batches), rest):
            yield from self.prepare(batches[start : start + rest])

    # -- the step -----------------------------------------------------------------------------------------
    def step(self, static: StaticBatch) -> torch.Tensor:
        """One training step (the same updates as the eager train_step) -> the loss, still on the device."""
        self._arm()
        shape = self.shapes.get(static.key) or self._new_shape(static)
        torch._foreach_copy_(shape.input_tensors, tensors_of(static.batch))
        strategy = self.strategy
        embeddings = None
        if self.embeds_in_graph:
            strategy.before_static_step(shape.inputs.batch.occurrences)
        else:  # the encoder runs eagerly; its embeddings become the graph's input
            embeddings = strategy.embed(static.batch.occurrences[: static.real])
            with torch.no_grad():
                shape.embeddings[: static.real].copy_(embeddings.detach())
        loss = self._run(shape)
        if embeddings is not None:
            assert shape.embeddings.grad is not None
            embeddings.backward(shape.embeddings.grad[: static.real])
            strategy.finish_items()
        self.scheduler.step()  # fills the device learning rate in place
        strategy.after_step()
        return loss

    def _arm(self) -> None:
        """Before the first step (and after any checkpoint load): gradients and learning rates the graphs can
        hold by address: preallocated gradients, zeroed in the graph, and learning rates in device tensors."""
        if self._armed:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.capture:
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self._armed = True

    def _new_shape(self, static: StaticBatch) -> _Shape:
        inputs = StaticBatch(
            with_tensors(static.batch, iter([t.clone() for t in tensors_of(static.batch)])), static.real, static.key
        )
        rows = len(static.batch.occurrences)
        dtype = next(self.head.parameters()).dtype  # the embeddings the head reads are in its own precision
        embeddings = torch.zeros(rows, self.dim, device=self.device, dtype=dtype)
        if self.strategy.wants_row_grads:
            embeddings.requires_grad_(True)
            embeddings.grad = torch.zeros_like(embeddings)
        shape = _Shape(inputs, embeddings, tensors_of(inputs.batch))
        self.shapes[static.key] = shape
        return shape

    def _run(self, shape: _Shape) -> torch.Tensor:
        if not self.capture:
            return self._body(shape)
        if shape.graph is None and shape.eager_steps < WARMUP_CALLS:
            loss = on_side_stream(self.device, lambda: self._body(shape))
            shape.eager_steps += 1
            return loss
        if shape.graph is None and not self._capture(shape):
            return self._body(shape)
        assert shape.graph is not None and shape.loss is not None
        shape.graph.replay()
        self.replays += 1
        return shape.loss.clone()  # the graph overwrites its output at the next replay

    def _capture(self, shape: _Shape) -> bool:
        """Captures the shape's step; False when that failed (every later step then runs eagerly)."""

        def step() -> None:
            shape.loss = self._body(shape)

        graphs = self.captured(step)
        if graphs is None:
            shape.loss = None
            return False
        [shape.graph] = graphs
        return True

    def _body(self, shape: _Shape) -> torch.Tensor:
        """The step as captured: zero gradients, embed, loss, backward, CF optimizer step, item-row updates."""
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        occurrences = shape.inputs.batch.occurrences
        embeddings = shape.embeddings
        if embeddings.grad is not None:
            embeddings.grad.zero_()
        rows = self.strategy.static_rows(occurrences) if self.embeds_in_graph else None
        if rows is not None and self.strategy.wants_row_grads:
            with torch.no_grad():
                embeddings.copy_(rows)
        elif rows is not None:
            embeddings = rows
        padded = torch.cat([embeddings, embeddings.new_zeros(1, self.dim)])  # the zero row padding points at
        total, count = self.task.static_loss_terms(self.head, padded, shape.inputs.batch)
        loss = total / count.to(total.dtype)
        loss.backward()
        self.optimizer.step()
        if rows is not None and self.strategy.wants_row_grads:
            assert shape.embeddings.grad is not None
            self.strategy.static_row_grads(occurrences, shape.embeddings.grad)
        return loss.detach()
