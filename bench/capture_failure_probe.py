"""Does a failed CUDA-graph capture leave CUDA's RNG in capture mode, and does training's capture recover from it?

BENCHMARKS.md §3 (issue #11, fourth session) saw a failed capture followed by "Offset increment outside graph capture
encountered unexpectedly" at the process's next dropout. `trainer/cuda_graphs.capture_graphs` answers a failed
capture with one trivial capture that ends cleanly. This probe checks that on a GPU, each case in a fresh process:

  * `none`: a bare `torch.cuda.graph` capture fails (a host synchronisation inside it), then dropout runs eagerly;
  * `restore`: the same capture through `capture_graphs`, then dropout, then a dropout graph captured and replayed;
  * `live-grad`: the failure met in training (an autograd graph made outside the capture still alive while a
    backward is captured), through `capture_graphs`, then the same.

    python3 bench/capture_failure_probe.py            # prints one JSON line per case
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

CASES = ("none", "restore", "live-grad")


def _synchronising_body(device: torch.device):
    """A capture body with dropout in it that a host synchronisation invalidates."""
    x = torch.randn(256, 64, device=device)

    def body() -> None:
        torch.nn.functional.dropout(x, 0.1).sum().item()  # a synchronisation: not allowed while capturing

    return body


def _live_grad_body(device: torch.device):
    """A captured backward while an eager forward's graph (AccumulateGrad nodes of the same weights) is alive."""
    layer = torch.nn.Linear(64, 64).to(device)
    alive = layer(torch.randn(32, 64, device=device)).sum()
    static = torch.randn(32, 64, device=device)

    def body() -> None:
        torch.nn.functional.dropout(layer(static), 0.1).sum().backward()

    body.alive = alive  # type: ignore[attr-defined]  # kept alive on purpose
    return body


def _fail(device: torch.device, body, guarded: bool) -> str:
    """The error a capture of `body` raised, bare or through capture_graphs."""
    from gramrec.trainer.cuda_graphs import CaptureFailed, capture_graphs, on_side_stream

    try:
        if guarded:
            on_side_stream(device, lambda: capture_graphs(device, [body]))
        else:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                body()
    except (CaptureFailed, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "capture did not fail"


def _dropout_runs(device: torch.device) -> str:
    try:
        torch.nn.functional.dropout(torch.ones(1024, device=device), 0.5).sum().item()
    except RuntimeError as error:
        return "error: " + str(error).splitlines()[0]
    return "ok"


def _dropout_graph_replays(device: torch.device) -> str:
    static = torch.ones(4096, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = torch.nn.functional.dropout(static, 0.5)
        graph.replay()
        first = out.clone()
        graph.replay()
        kept = float((out != 0).float().mean())
        differs = bool((first != out).any())
    except RuntimeError as error:
        return "error: " + str(error).splitlines()[0]
    return f"ok (kept {kept:.3f}, a new mask each replay: {differs})"


def run_case(case: str) -> dict:
    device = torch.device("cuda")
    _dropout_runs(device)  # CUDA and the generator initialised before anything fails
    body = _live_grad_body(device) if case == "live-grad" else _synchronising_body(device)
    failure = _fail(device, body, guarded=case != "none")
    torch.cuda.synchronize(device)
    result = {"case": case, "capture": failure, "dropout after": _dropout_runs(device)}
    if case != "none":
        result["dropout graph after"] = _dropout_graph_replays(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (default: each in its own)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}), flush=True)
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"case": case, "exit": done.returncode, "stderr": done.stderr[-600:]}), flush=True)
        else:
            print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
