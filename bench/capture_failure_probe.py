"""Does a failed CUDA-graph capture leave CUDA's RNG in capture mode, and does `restore_after_failed_capture` end it?

BENCHMARKS.md §3 (issue #11, fourth session) saw a failed capture followed by "Offset increment outside graph capture
encountered unexpectedly" at the process's next dropout. `trainer/encoder_graphs.py` answers a failed capture with
one trivial capture that ends cleanly. This probe checks that on a GPU, each case in a fresh process:

  * `none`: a capture fails (a host synchronisation inside it), then dropout runs eagerly;
  * `restore`: the same, with `restore_after_failed_capture` before the dropout, then a dropout graph is captured
    and replayed;
  * `live-grad`: the failure met in training (an autograd graph made outside the capture still alive while a
    backward is captured), with the restore, then dropout.

    python3 bench/capture_failure_probe.py            # prints one JSON line per case
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

CASES = ("none", "restore", "live-grad")


def _fail_a_capture(device: torch.device) -> str:
    """A capture with dropout in it that a host synchronisation invalidates; the error it raised."""
    x = torch.randn(256, 64, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            y = torch.nn.functional.dropout(x, 0.1)
            y.sum().item()  # a synchronisation: not allowed while capturing
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return "capture did not fail"


def _fail_with_live_grad(device: torch.device) -> str:
    """An eager forward's graph (AccumulateGrad nodes made on the default stream) alive during a captured backward."""
    layer = torch.nn.Linear(64, 64).to(device)
    alive = layer(torch.randn(32, 64, device=device)).sum()  # noqa: F841 - kept alive on purpose
    static = torch.randn(32, 64, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph):
                torch.nn.functional.dropout(layer(static), 0.1).sum().backward()
    except RuntimeError as error:
        return str(error).splitlines()[0]
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
    from gramrec.trainer.encoder_graphs import restore_after_failed_capture

    device = torch.device("cuda")
    _dropout_runs(device)  # CUDA and the generator initialised before anything fails
    failure = _fail_with_live_grad(device) if case == "live-grad" else _fail_a_capture(device)
    torch.cuda.synchronize(device)
    if case != "none":
        restore_after_failed_capture(device)
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
