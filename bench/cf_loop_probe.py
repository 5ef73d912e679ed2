"""Where the graphed CF step's time goes in the real loop (issue #11: 0.68-0.93 ms in the loop, 0.52 steady).

For NoFinetune (no encoder: the step is the CF head alone) on each workload, one run, the same epoch of batches:

  * epoch 1: the loop as train() runs it (batches prepared a chunk at a time as the loop reaches them), graph
    captures and each shape's eager warm-up steps inside;
  * epoch 2: the same again, every shape already captured: the loop's steady cost per step;
  * prepared: the same batches prepared before the loop (as the trainer did before), preparation timed apart;
  * host: each loop's steps timed on the host without synchronising (what Python and the launches cost; the host
    runs ahead of the GPU until the launch queue is full, then waits in it);
  * replay: each shape's graph replayed back to back, weighted by how often the epoch uses it: the GPU's floor;
  * the same with the head's dropout off (a fresh run), since the issue's steady figure had dropout off.

    python bench/cf_loop_probe.py --smoke --device cpu
    python bench/cf_loop_probe.py --workloads mind-title nr-mind toeic --encoder-dir DIR --data-root DIR

Results: `--out` (default $OUT, else bench/results/cf_loop)/cf_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench import train_bench
from gramrec.trainer.train import train_step

say = train_bench.say


def loop(run, steps, device) -> tuple[float, float]:
    """(wall seconds synchronised at both ends, host seconds spent inside train_step) for one pass over steps."""
    host = 0.0
    start = train_bench.now(device)
    for batch in steps:
        t = time.perf_counter()
        train_step(run, batch)
        host += time.perf_counter() - t
    return train_bench.now(device) - start, host


def replay_floor(run, steps, device, repeats: int) -> float | None:
    """Seconds per step if every step were its shape's graph replayed back to back (no host work between)."""
    step = run.static_step
    if step is None or not step.capture:
        return None
    uses = Counter(s.key for s in steps)
    total = 0.0
    for key, count in uses.items():
        graph = step.shapes[key].graph
        if graph is None:
            continue
        start = train_bench.now(device)
        for _ in range(repeats):
            graph.replay()
        total += (train_bench.now(device) - start) / repeats * count
    return total / len(steps)


def probe(workload, source, device, dropout: bool, repeats: int) -> dict:
    run, _ = train_bench.build_run(workload, "nofinetune", source, device)
    if not dropout:
        train_bench.no_dropout(run.head)
    batches = workload.epoch_batches(0)
    static = run.static_step

    def streamed():
        return static.stream(batches) if static is not None else batches

    first, first_host = loop(run, streamed(), device)  # as train() runs its first epoch
    second, second_host = loop(run, streamed(), device)  # a later epoch: every shape captured
    t = time.perf_counter()
    steps = static.prepare(batches) if static is not None else batches
    prepare_s = time.perf_counter() - t
    third, third_host = loop(run, steps, device)  # the epoch prepared before its loop
    floor = replay_floor(run, steps, device, repeats)
    n = len(steps)
    stats = train_bench.graph_stats(run)
    return {"steps": n, "prepare_ms_per_step": prepare_s / n * 1e3,
            "epoch1_ms_per_step": first / n * 1e3, "epoch1_host_ms_per_step": first_host / n * 1e3,
            "epoch2_ms_per_step": second / n * 1e3, "epoch2_host_ms_per_step": second_host / n * 1e3,
            "prepared_ms_per_step": third / n * 1e3, "prepared_host_ms_per_step": third_host / n * 1e3,
            "replay_floor_ms_per_step": floor * 1e3 if floor is not None else None,
            "shapes": stats.get("graph_shapes"), "capture_s": stats.get("graph_capture_s"),
            "shape_uses": sorted(Counter(str(s.key) for s in steps).values(), reverse=True)
            if static is not None else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=train_bench.ALL_WORKLOADS, default=["mind-title"])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder-dir", default=None)
    parser.add_argument("--repeats", type=int, default=50, help="replays per shape for the GPU floor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "cf_loop"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    bench_args = train_bench.parse_args(["--data-root", args.data_root, "--cf-step", "graphed" if args.smoke else "auto",
                                         *(["--encoder-dir", args.encoder_dir] if args.encoder_dir else []),
                                         *(["--smoke"] if args.smoke else [])])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = train_bench.EncoderSource(bench_args, device)
    results: dict = {"meta": {"argv": list(sys.argv[1:] if argv is None else argv), "device_name":
                              torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    for name in args.workloads:
        tokenizer_dir = Path(args.encoder_dir) if args.encoder_dir else None
        workload = train_bench.build_workload(name, bench_args, source, tokenizer_dir, device)
        for dropout in (True, False):
            r = results.setdefault(name, {})["dropout" if dropout else "no_dropout"] = probe(
                workload, source, device, dropout, args.repeats)
            floor = r["replay_floor_ms_per_step"]
            say(f"{name} ({'dropout' if dropout else 'no dropout'}): {r['steps']} steps, {r['shapes']} shapes; epoch 1 "
                f"{r['epoch1_ms_per_step']:.3f} ms/step (host {r['epoch1_host_ms_per_step']:.3f}), epoch 2 "
                f"{r['epoch2_ms_per_step']:.3f} ms/step (host {r['epoch2_host_ms_per_step']:.3f}), prepared before the "
                f"loop {r['prepared_ms_per_step']:.3f} ms/step (host {r['prepared_host_ms_per_step']:.3f}; preparing "
                f"{r['prepare_ms_per_step']:.3f} ms/step), replay floor {floor if floor is None else round(floor, 3)} ms")
            (out / "cf_loop.json").write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
