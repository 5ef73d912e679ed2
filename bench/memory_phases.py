"""Where a training run's peak GPU memory is reached: bench/train_bench.py with its phases' peaks recorded.

The memory budget (`--encoder-memory-gib`, trainer/memory_budget.py) bounds what it estimates; when a run's peak
passes the budget, this names the phase that did it. Each wrapped call records the memory allocated when it
started and the highest allocation while it ran (nested calls included), aggregated per phase:

    python3 bench/memory_phases.py --data-root ../data --encoder-dir ../minilm --workloads mind-title \
        --strategies gram-1e --skip-train --encoder-memory-gib mind-title=1.45

Every argument goes to train_bench.py; the phase table is printed after its report (GiB, this process's
allocations only) with each phase's seconds (the GPU synchronised around every wrapped call, so times attribute the
epoch's work, a little slower than train_bench's own figures). The wrappers reset CUDA's peak counter, so
train_bench's own peak column is not valid here.

`--trace` (taken before the rest goes to train_bench) also records CUDA's allocator history with Python stacks
over each measured epoch and names what is live at its peak: allocations grouped by the project's innermost frame
(written to $OUT/memory_trace.json and printed). Recording slows the run; its times are not figures.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_bench  # noqa: E402

from gramrec.models.content_encoder import ContentEncoder  # noqa: E402
from gramrec.trainer import regression  # noqa: E402
from gramrec.trainer.graphed_step import StaticCFStep  # noqa: E402
from gramrec.trainer.strategies import GramMultiStep  # noqa: E402

GIB = 2**30
# One entry per wrapped call still running: the highest allocation seen inside it before its latest reset of CUDA's
# peak counter (a nested call resets it, then hands its own peak back here).
_open_peaks: list[int] = []
_phases: dict[str, dict[str, float]] = defaultdict(
    lambda: {"calls": 0, "start": 0.0, "peak": 0.0, "rise": 0.0, "seconds": 0.0}
)


def _label_encode(args, kwargs) -> str:
    """encode(self, tokens, idx, batch_size, progress, autocast): its precision, autograd and size class."""
    items = args[2] if len(args) > 2 else kwargs["idx"]
    autocast = kwargs.get("autocast", args[5] if len(args) > 5 else True)
    grad = "grad" if torch.is_grad_enabled() else "no-grad"
    size = f"{len(items):,} items" if len(items) > 20_000 else "<=20k items"
    return f"encode {'bf16' if autocast else 'float32'} {grad} ({size})"


def _wrap(owner, name: str, label=None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        if not torch.cuda.is_available():
            return original(*args, **kwargs)
        phase = label(args, kwargs) if callable(label) else (label or name)
        if _open_peaks:
            _open_peaks[-1] = max(_open_peaks[-1], torch.cuda.max_memory_allocated())
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _open_peaks.append(start)
        capturing = torch.cuda.is_current_stream_capturing()  # no synchronising inside a graph capture
        if not capturing:
            torch.cuda.synchronize()
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if not capturing:
                torch.cuda.synchronize()
            entry = _phases[phase]
            entry["seconds"] += time.perf_counter() - began
            peak = max(_open_peaks.pop(), torch.cuda.max_memory_allocated())
            if _open_peaks:
                _open_peaks[-1] = max(_open_peaks[-1], peak)
            entry["calls"] += 1
            if peak - start >= entry["rise"]:
                entry["start"], entry["peak"], entry["rise"] = start, peak, peak - start

    setattr(owner, name, recorded)


TRACE_EVENTS = 1_500_000  # a ring buffer: a trace this long lost its start (reported)
PROJECT_DIRS = ("/trainer/", "/models/", "/bench/", "/service/")


def allocated_at(frames: list[dict], depth: int = 3) -> str:
    """Where an allocation was made: the innermost `depth` frames in this project's files, innermost first."""
    own = [f for f in frames if any(d in f["filename"] for d in PROJECT_DIRS) and "site-packages" not in f["filename"]]
    where = [f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}" for f in own[:depth]]
    return " <- ".join(where) or "(no project frame)"


def live_at_peak(trace: list[dict], baseline: int) -> dict:
    """Replay an allocator trace: the peak of allocated bytes (the window's start counted as `baseline`) and the
    allocations made inside the window that are live at that peak, grouped by their project frames."""
    live: dict[int, int] = {}
    total = peak = baseline
    peak_at = -1
    for i, event in enumerate(trace):
        action, addr = event["action"], event["addr"]
        if action == "alloc":
            live[addr] = event["size"]
            total += event["size"]
        elif addr in live and action in ("free_requested", "free_completed"):
            total -= live.pop(addr)
        elif action == "free_requested":  # allocated before the window began
            total -= event["size"]
        if total > peak:
            peak, peak_at = total, i
    # Replay again up to the peak, keeping which allocations are live there.
    alive: dict[int, dict] = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            alive.pop(event["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in alive.values():
        key = allocated_at(event.get("frames", []))
        groups[key][0] += event["size"]
        groups[key][1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_event": peak_at,
        "events": len(trace),
        "live_in_window_bytes": sum(e["size"] for e in alive.values()),
        "groups": [{"where": k, "bytes": b, "blocks": n} for k, (b, n) in top],
    }


def _trace_epochs(traces: list[dict]) -> None:
    """Wrap train_bench.measure_epoch so each epoch records the allocator's history and is analysed after."""
    original = train_bench.measure_epoch

    @functools.wraps(original)
    def traced(workload, label, *args, **kwargs):
        if not torch.cuda.is_available():
            return original(workload, label, *args, **kwargs)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=TRACE_EVENTS)
        try:
            return original(workload, label, *args, **kwargs)
        finally:
            try:
                snapshot = torch.cuda.memory._snapshot()
                trace = snapshot["device_traces"][torch.cuda.current_device()]
                traces.append({"workload": workload.name, "strategy": label, **live_at_peak(trace, baseline)})
            except Exception as error:  # the phase table still matters when the trace cannot be read
                traces.append({"workload": workload.name, "strategy": label, "error": repr(error)})
            torch.cuda.memory._record_memory_history(enabled=None)

    train_bench.measure_epoch = traced


def _print_traces(traces: list[dict]) -> None:
    out = Path(os.environ.get("OUT") or "bench/results/train")
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_trace.json").write_text(json.dumps(traces, indent=1))
    for t in traces:
        if "error" in t:
            print(f"\ntrace {t['workload']} {t['strategy']}: {t['error']}")
            continue
        print(
            f"\ntrace {t['workload']} {t['strategy']}: peak {t['peak_bytes'] / GIB:.3f} GiB (window start "
            f"{t['baseline_bytes'] / GIB:.3f}, live from the window {t['live_in_window_bytes'] / GIB:.3f}; "
            f"event {t['peak_event']:,} of {t['events']:,})"
        )
        print("| live at the peak (GiB) | blocks | where (innermost project frames) |\n|---|---|---|")
        for g in t["groups"]:
            print(f"| {g['bytes'] / GIB:.3f} | {g['blocks']} | {g['where']} |")


def main() -> None:
    argv = sys.argv[1:]
    traces: list[dict] = []
    if "--trace" in argv:
        argv.remove("--trace")
        _trace_epochs(traces)
    _wrap(ContentEncoder, "encode", _label_encode)
    _wrap(regression, "_accumulate_gradients", "regression: a batch's gradients")
    _wrap(regression, "_line_search", "regression: line search")
    _wrap(regression._Start, "measure", "regression: start measurement")
    _wrap(GramMultiStep, "regress", "regression (whole)")
    _wrap(GramMultiStep, "_starting_encoding", "initial table encoding")
    _wrap(StaticCFStep, "step", "CF step (graphed path)")
    _wrap(train_bench, "build_run", "building the run (strategy, initial table)")
    _wrap(train_bench, "measure_epoch", "the measured epoch, whole")
    train_bench.main(argv)
    print(
        "\n| phase | calls | seconds | allocated at its start (GiB) | its peak (GiB) | rise (GiB) |\n|---|---|---|---|---|---|"
    )
    for phase, e in sorted(_phases.items(), key=lambda kv: -kv[1]["peak"]):
        print(
            f"| {phase} | {int(e['calls'])} | {e['seconds']:.2f} | {e['start'] / GIB:.3f} | {e['peak'] / GIB:.3f} | {e['rise'] / GIB:.3f} |"
        )
    _print_traces(traces)


if __name__ == "__main__":
    main()
