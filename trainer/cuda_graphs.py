"""What every CUDA graph of training shares: real warm-up calls on a side stream, capture, and recovery when a
capture fails (the CF step's graphs, trainer/graphed_step.py, and the encoder's, trainer/encoder_graphs.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # real (eager) calls per shape before its capture: allocator, cuBLAS/cuDNN workspaces, Adam state
T = TypeVar("T")


class CaptureFailed(RuntimeError):
    """A capture failed and CUDA's RNG is usable again: the caller runs its bodies eagerly from here on."""


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one warm-up stream of `device`, made on first use and kept. One, not one per call: cuBLAS keeps a
    workspace for every stream it runs on until the process ends, so a fresh stream per warm-up call kept ~65 MiB
    allocated for good on an H100 (bench/graph_memory_probe.py: 65 MiB a call, 1.04 GiB over mind-title's 16
    warm-up calls under a memory budget; BENCHMARKS.md §3, sixth session)."""
    key = torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(key)
    return _side_streams[key]


def on_side_stream(device: torch.device, body: Callable[[], T]) -> T:
    """Runs a warm-up call on the device's side stream, after the current stream's queued work and before its
    next: PyTorch asks for warm-up off the default stream, so the lazy state it creates (cuBLAS handles,
    workspaces) belongs to no stream that a capture will use."""
    current = torch.cuda.current_stream(device)
    side = side_stream(device)
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


class CapturedGraphs:
    """The capture switch and counters of one family of graphs (the CF step's, the encoder's), and its capture: a
    failure turns capture off for the run with a warning, and the family's calls run eagerly from then on (exact,
    not faster). `pool`: a private memory pool the family's graphs share (None: one per capture)."""

    graphs_name = "CUDA graphs"  # which family the warning names

    def __init__(self, device: torch.device):
        self.device = device
        self.capture = device.type == "cuda"
        self.pool: tuple[int, int] | None = None  # torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0
        self.capture_s = 0.0  # seconds spent capturing (inside the training loop, so in epoch times)
        self.capture_error: str | None = None

    def captured(self, *bodies: Callable[[], None]) -> list[torch.cuda.CUDAGraph] | None:
        """One graph per body, captured in order; None when the capture failed (capture is then off)."""
        torch.cuda.synchronize(self.device)  # the capture's time, not the queued work's
        started = time.perf_counter()
        try:
            graphs = capture_graphs(self.device, bodies, self.pool)
        except CaptureFailed as error:
            self.capture, self.capture_error = False, str(error)
            log.warning("graphs off: capture failed", extra={"graphs": self.graphs_name, "error": self.capture_error})
            return None
        self.capture_s += time.perf_counter() - started
        self.captures += 1
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
