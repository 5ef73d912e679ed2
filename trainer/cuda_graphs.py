"""What every CUDA graph of training shares: real warm-up calls on a side stream, capture, and recovery when a
capture fails (the CF step's graphs, trainer/graphed_step.py, and the encoder's, trainer/encoder_graphs.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # real (eager) calls per shape before its capture: allocator, cuBLAS/cuDNN workspaces, Adam state
T = TypeVar("T")


class CaptureFailed(RuntimeError):
    """A capture failed and CUDA's RNG is usable again: the caller runs its bodies eagerly from here on."""


def on_side_stream(device: torch.device, body: Callable[[], T]) -> T:
    """Runs a warm-up call on a side stream, after the current stream's queued work and before its next: PyTorch
    asks for warm-up off the default stream, so the lazy state it creates (cuBLAS handles, workspaces) belongs to
    no stream that a capture will use."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = body()
    current.wait_stream(side)
    return out


def capture_graphs(device: torch.device, bodies: Sequence[Callable[[], None]], pool=None) -> list[torch.cuda.CUDAGraph]:
    """One graph per body, captured in order (into `pool` when given). Raises CaptureFailed (RNG restored)."""
    graphs = []
    try:
        for body in bodies:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                body()
            graphs.append(graph)
    except RuntimeError as error:
        torch.cuda.synchronize(device)
        restore_after_failed_capture(device)
        raise CaptureFailed(f"{type(error).__name__}: {error}") from error
    return graphs


def restore_after_failed_capture(device: torch.device) -> None:
    """A capture that fails ends before PyTorch takes CUDA's RNG out of capture mode, and every later random kernel
    (dropout) then raises "Offset increment outside graph capture" (measured on an H100); one trivial capture that
    ends cleanly takes it out (bench/capture_failure_probe.py checks this on a GPU)."""
    scratch = torch.zeros(1, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            scratch.add_(1.0)
    except RuntimeError as error:
        log.warning("CUDA graph state not restored after a failed capture", extra={"error": repr(error)})
    torch.cuda.synchronize(device)
