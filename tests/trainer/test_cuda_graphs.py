"""Capture and its failure path (trainer/cuda_graphs.py), with torch.cuda's graph calls replaced by recorders: a CPU
has no graphs. bench/capture_failure_probe.py checks the RNG restore itself on a GPU."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from gramrec.trainer import cuda_graphs, graphed_step
from gramrec.trainer.cuda_graphs import CaptureFailed, capture_graphs
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import train_step
from tests.helpers.gram_runs import TASKS, make_run, max_relative_difference, parameters


@pytest.fixture
def events(monkeypatch):
    """torch.cuda's capture calls recorded instead of run."""
    recorded: list[str] = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None):
        recorded.append("begin")
        yield
        recorded.append("end")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: recorded.append("sync"))
    monkeypatch.setattr(cuda_graphs, "restore_after_failed_capture", lambda device: recorded.append("restore"))
    return recorded


def test_each_body_is_captured_once_in_order(events):
    ran: list[int] = []
    graphs = capture_graphs(torch.device("cpu"), [lambda: ran.append(0), lambda: ran.append(1)])
    assert len(graphs) == 2 and ran == [0, 1]
    assert events == ["begin", "end", "begin", "end"]


def test_a_failed_capture_restores_the_rng_and_names_the_error(events):
    def synchronises() -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(CaptureFailed, match="RuntimeError: CUDA error: operation not permitted"):
        capture_graphs(torch.device("cpu"), [lambda: None, synchronises])
    assert events == ["begin", "end", "begin", "sync", "restore"]


def test_a_cf_step_whose_capture_fails_goes_on_eagerly_with_the_same_updates(monkeypatch):
    """The graphed CF step on a CPU, told to capture: warm-up steps, then a capture that fails; every step after
    runs the eager body, so the run makes the same updates as one that never tried."""

    def fails(device, bodies, pool=None):
        raise CaptureFailed("RuntimeError: cudaErrorStreamCaptureInvalidated")

    monkeypatch.setattr(graphed_step, "on_side_stream", lambda device, body: body())
    monkeypatch.setattr(cuda_graphs, "capture_graphs", fails)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    reference = make_run(GramMultiStep, "nr", "adam", period="2s", cf_step="graphed", batch_size=4)
    tried = make_run(GramMultiStep, "nr", "adam", period="2s", cf_step="graphed", batch_size=4)
    tried.static_step.capture = True
    reference.static_step.capture = True  # the same learning rates in device tensors, as a capture needs
    reference.static_step._arm()
    reference.static_step.capture = False
    for batch in TASKS["nr"][2](5):
        loss = train_step(reference, copy.deepcopy(batch))
        assert abs(float(train_step(tried, copy.deepcopy(batch)) - loss)) <= 1e-10 * abs(float(loss))
    step = tried.static_step
    assert step.capture is False and "cudaErrorStreamCaptureInvalidated" in step.capture_error
    assert step.captures == 0 and all(shape.graph is None for shape in step.shapes.values())
    assert max_relative_difference(parameters(tried), parameters(reference)) < 1e-9


def test_warm_up_calls_share_one_side_stream_per_device(monkeypatch):
    """A stream per warm-up call left a cuBLAS workspace allocated for each (~65 MiB on an H100,
    bench/graph_memory_probe.py): every warm-up on a device now runs on the same stream, one per device."""
    made: list[torch.device] = []

    class Stream:
        def __init__(self, device):
            made.append(device)

        def wait_stream(self, other) -> None:
            pass

    monkeypatch.setattr(cuda_graphs, "_side_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ran = [cuda_graphs.on_side_stream(torch.device("cuda"), lambda: 7) for _ in range(3)]
    ran.append(cuda_graphs.on_side_stream(torch.device("cuda:1"), lambda: 3))
    sides = cuda_graphs._side_streams
    assert ran == [7, 7, 7, 3]
    assert set(sides) == {torch.device("cuda:0"), torch.device("cuda:1")}
    assert cuda_graphs.side_stream(torch.device("cuda:0")) is sides[torch.device("cuda:0")]
    assert made == [torch.device("cuda:0"), torch.device("cuda:1")]
