"""Data-parallel scaling: one training epoch per strategy on 1 GPU and on N GPUs (torchrun), same global batch.

    python bench/ddp_bench.py --data-root DATA --encoder-dir DIR --gpus 2 [--out DIR]

The driver runs itself once as a lone process and once under `torchrun --nproc_per_node N`; each run trains
one epoch of every strategy through the library's own pieces (`build_run`, `train_step`, the strategies'
all-reduces), timing the step loop (regressions included) between device syncs and a barrier. Strategy
construction (multi-step GRAM's initial encoding of all items, which every rank does in full) is reported
apart. Scaling efficiency = epoch time on 1 GPU / (N x epoch time on N GPUs). Prints a table last; JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

STRATEGIES = {"e2e": ("e2e", "1e"), "gram-1s": ("gram", "1s"), "gram-1e": ("gram", "1e")}
TASKS = {"nr": "mind_small_subset", "kt": "codeworkout_s19"}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from gramrec.trainer.distributed import init_from_env
    from gramrec.trainer.settings import TrainSettings
    from gramrec.trainer.train import build_run, resolve_device, train_step

    device = resolve_device("auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = init_from_env(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world.is_distributed:
            dist.barrier()

    results = {}
    for task, folder in TASKS.items():
        if task not in args.tasks:
            continue
        for label in args.strategies:
            strategy, period = STRATEGIES[label]
            settings = TrainSettings(
                task=task, data=Path(args.data_root) / folder, strategy=strategy, period=period,
                batch_size=args.batch_size, encoder_dir=Path(args.encoder_dir), progress=False,
                encoder_batch_size=args.encoder_batch_size, encoder_batch_tokens=args.encoder_batch_tokens,
                cf_step="eager",  # the graphed step runs in one process only: both sides of the scaling take the eager one
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run = build_run(settings, world=world)
            batches = run.task.train_batches(np.random.default_rng([settings.seed, 0]), world)
            batches = batches[: args.max_steps] if args.max_steps else batches
            for batch in batches[: args.warmup_steps]:  # kernels, allocator; the timed epoch starts afterwards
                train_step(run, batch, world)
            sync()
            started = time.perf_counter()
            for batch in batches:
                train_step(run, batch, world)
            sync()
            epoch_s = time.perf_counter() - started
            results[f"{task}/{label}"] = {
                "epoch_s": epoch_s, "steps": len(batches), "setup_s": run.setup_s,
                "interactions": run.task.interactions(), "global_batch": args.batch_size,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            }
            if world.is_main:
                print(f"[{world.size} GPU] {task} {label}: epoch {epoch_s:.2f}s ({len(batches)} steps), "
                      f"setup {run.setup_s:.2f}s", flush=True)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if world.is_main:
        Path(args.out, f"ddp_{world.size}.json").write_text(json.dumps(results, indent=2))
    if world.is_distributed:
        dist.destroy_process_group()


def driver(args: argparse.Namespace, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, script, "--worker", *argv], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                    script, "--worker", *argv], check=True, env=env)
    one = json.loads((out / "ddp_1.json").read_text())
    many = json.loads((out / f"ddp_{args.gpus}.json").read_text())
    summary = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "gpus": args.gpus,
               "argv": argv, "runs": {}}
    print(f"\n| task/strategy | global batch | steps | epoch 1 GPU (s) | epoch {args.gpus} GPUs (s) | speedup | "
          f"scaling efficiency | setup 1 / {args.gpus} GPUs (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, a in one.items():
        b = many.get(key)
        if not b:
            continue
        speedup = a["epoch_s"] / b["epoch_s"]
        summary["runs"][key] = {"one": a, "many": b, "speedup": speedup, "efficiency": speedup / args.gpus}
        print(f"| {key} | {a['global_batch']} | {a['steps']} | {a['epoch_s']:.2f} | {b['epoch_s']:.2f} | "
              f"{speedup:.2f}x | {speedup / args.gpus:.0%} | {a['setup_s']:.1f} / {b['setup_s']:.1f} |")
    (out / "ddp_bench.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--encoder-dir", required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["nr", "kt"], choices=list(TASKS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--batch-size", type=int, default=128, help="global CF batch (split across ranks)")
    parser.add_argument("--encoder-batch-size", type=int, default=4096)
    parser.add_argument("--encoder-batch-tokens", type=int, default=65536)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="cut the epoch (smoke runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "ddp"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = [a for a in sys.argv[1:] if a != "--worker"]
    args = parser.parse_args()
    if args.worker:
        from gramrec.trainer.logs import configure_logging

        configure_logging()
        worker(args)
    else:
        driver(args, argv)


if __name__ == "__main__":
    main()
