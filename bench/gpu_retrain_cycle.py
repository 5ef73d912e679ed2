"""One retrain cycle per real dataset, phase by phase, on whatever device is given (issue 14: on the GPU).

    python bench/gpu_retrain_cycle.py --device cuda --out $OUT/gpu_cycle.json
    .venv/bin/python bench/gpu_retrain_cycle.py --device cpu --per-day 20 --kt-rows 3000   # a CPU rehearsal

No HTTP server (the device image has no FastAPI): the embedded sqlite store, the product's first start
(train_and_export, as `gramrec serve` does it) and RetrainJob, the code `gramrec trainer` runs for each job.
kt: CodeWorkout in assignment order, base = the first 4/6, then 1/6 logged and a FULL retrain, then the last 1/6
logged and an INCREMENTAL retrain. nr: the MIND subset, base = 11/9-11/12, 11/13 logged and a full retrain, 11/14
logged and an incremental one. Each job records its phase timings (snapshot, train, gate, export, table,
activate); export's item-table encoding and the training both run on --device. Results are written after every
step, so a cut-short run still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.replay_bench import START  # noqa: E402
from bench.replay_data import kt_slices, kt_timestamp, mind_days, write_kt_base, write_mind_base  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", nargs="+", default=["kt", "nr"])
    parser.add_argument("--per-day", type=int, default=5000, help="nr: impressions per day (all: 5000)")
    parser.add_argument("--kt-rows", type=int, default=None, help="kt: first rows only (CPU rehearsal)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="training seconds per retrain")
    parser.add_argument("--encoder-dir", type=Path, default=None)
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--mind", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def kt_plan(args, folder: Path):
    texts, slices = kt_slices(args.codeworkout, 5)
    if args.kt_rows:
        slices = [s[: args.kt_rows // 6] for s in slices]
    base = write_kt_base(folder, texts, [row for s in slices[:4] for row in s])
    sent = iter(range(10**9))

    def records(rows):
        return [
            {
                "user_id": r.user,
                "item_id": r.item,
                "correct": str(r.correct),
                "timestamp": kt_timestamp(START, next(sent)),
            }
            for r in rows
        ]

    return base, [records(slices[4]), records(slices[5])], sum(len(s) for s in slices[:4])


def nr_plan(args, folder: Path):
    news, days = mind_days(args.mind, args.per_day, 5)
    base = write_mind_base(folder, news, [imp for day in days[:4] for imp in day])

    def records(day):
        return [
            {
                "user_id": imp.user,
                "history": " ".join(imp.history),
                "impressions": " ".join(f"{n}-{label}" for n, label in imp.shown),
                "timestamp": imp.time.replace(tzinfo=UTC).isoformat(),
            }
            for imp in day
        ]

    return base, [records(days[4]), records(days[5])], sum(len(d) for d in days[:4])


def settings_for(args, task: str, work: Path, base: Path):
    from gramrec.trainer.retrain.settings import WorkerSettings

    train = {"progress": False} | ({"encoder_dir": str(args.encoder_dir)} if args.encoder_dir else {})
    return WorkerSettings(
        redis_url=None,
        embedded_store_path=work / "store.sqlite3",
        artifacts_dir=work / "artifacts",
        tasks=[task],
        bootstrap=False,
        bootstrap_kt_data=base,
        bootstrap_nr_data=base,
        bootstrap_device=args.device,
        bootstrap_train=train,
        retrain={"tasks": [task], "device": args.device, "gate_tolerance": 1.0, "time_budget_s": args.time_budget_s},
    )


def run_job(settings, store, task: str, mode: str) -> dict:
    from gramrec.service.schemas import Job
    from gramrec.trainer.retrain.job import RetrainJob

    lease = store.lease("retrain", 600)
    assert lease.acquire()
    try:
        job = store.enqueue_job(Job.queued(task, "admin", {"mode": mode}))
        assert store.next_job()["id"] == job["id"]
        started = time.perf_counter()
        finished = RetrainJob(job, settings, store, lease, threading.Event()).run()
        finished["wall_s"] = round(time.perf_counter() - started, 2)
        store.finish_current_job(job["id"])
        return finished
    finally:
        lease.release()


def cycle(args, task: str, results: dict) -> None:
    from gramrec.service.activation import activate, bundle_loader
    from gramrec.service.artifact import list_versions
    from gramrec.service.store import open_store
    from gramrec.trainer.bootstrap import train_and_export

    work = Path(tempfile.mkdtemp(prefix=f"cycle-{task}-"))
    base, logs, base_size = (kt_plan if task == "kt" else nr_plan)(args, work / "base")
    settings = settings_for(args, task, work, base)
    mine: dict = {"base_interactions": base_size, "steps": []}
    results[task] = mine
    started = time.perf_counter()
    version = train_and_export(settings, task).name
    mine["first_start_train_export_s"] = round(time.perf_counter() - started, 2)
    store = open_store(settings)
    started = time.perf_counter()
    activate(store, settings.artifacts_dir, version, load_bundle=bundle_loader(), list_versions=list_versions)
    mine["first_start_activate_s"] = round(time.perf_counter() - started, 2)
    write(args, results)
    for mode, records in zip(["full", "incremental"], logs, strict=True):
        store.log_interactions(task, records)
        job = run_job(settings, store, task, mode)
        mine["steps"].append(
            {"mode": mode, "logged": len(records)}
            | {k: job.get(k) for k in ("status", "error", "timings", "wall_s", "data", "metrics")}
        )
        print(task, mode, job["status"], job.get("error"), job["timings"], flush=True)
        write(args, results)
    store.close()


def write(args, results: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    results: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for task in args.tasks:
        try:
            cycle(args, task, results)
        except Exception as exc:  # report it and go on with the other dataset
            results.setdefault(task, {})["error"] = f"{type(exc).__name__}: {exc}"
            print(task, "failed:", exc, flush=True)
        write(args, results)


if __name__ == "__main__":
    main()
