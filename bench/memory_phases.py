"""Where a training run's peak GPU memory is reached: bench/train_bench.py with its phases' peaks recorded.

The memory budget (`--encoder-memory-gib`, trainer/memory_budget.py) bounds what it estimates; when a run's peak
passes the budget, this names the phase that did it. Each wrapped call records the memory allocated when it
started and the highest allocation while it ran (nested calls included), aggregated per phase:

    python3 bench/memory_phases.py --data-root ../data --encoder-dir ../minilm --workloads mind-title \
        --strategies gram-1e --skip-train --encoder-memory-gib mind-title=1.45

Every argument goes to train_bench.py; the phase table is printed after its report (GiB, this process's
allocations only). The wrappers reset CUDA's peak counter, so train_bench's own peak column is not valid here.
"""

from __future__ import annotations

import functools
import sys
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
_phases: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "start": 0.0, "peak": 0.0, "rise": 0.0})


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
        try:
            return original(*args, **kwargs)
        finally:
            peak = max(_open_peaks.pop(), torch.cuda.max_memory_allocated())
            if _open_peaks:
                _open_peaks[-1] = max(_open_peaks[-1], peak)
            entry = _phases[phase]
            entry["calls"] += 1
            if peak - start >= entry["rise"]:
                entry["start"], entry["peak"], entry["rise"] = start, peak, peak - start

    setattr(owner, name, recorded)


def main() -> None:
    _wrap(ContentEncoder, "encode", _label_encode)
    _wrap(regression, "_accumulate_gradients", "regression: a batch's gradients")
    _wrap(regression, "_line_search", "regression: line search")
    _wrap(regression._Start, "measure", "regression: start measurement")
    _wrap(GramMultiStep, "regress", "regression (whole)")
    _wrap(GramMultiStep, "_starting_encoding", "initial table encoding")
    _wrap(StaticCFStep, "step", "CF step (graphed path)")
    _wrap(train_bench, "build_run", "building the run (strategy, initial table)")
    _wrap(train_bench, "measure_epoch", "the measured epoch, whole")
    train_bench.main(sys.argv[1:])
    print("\n| phase | calls | allocated at its start (GiB) | its peak (GiB) | rise (GiB) |\n|---|---|---|---|---|")
    for phase, e in sorted(_phases.items(), key=lambda kv: -kv[1]["peak"]):
        print(
            f"| {phase} | {int(e['calls'])} | {e['start'] / GIB:.3f} | {e['peak'] / GIB:.3f} | {e['rise'] / GIB:.3f} |"
        )


if __name__ == "__main__":
    main()
