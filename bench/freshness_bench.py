"""Freshness (issue 14): seconds from POST /interactions until a served model that trained on that interaction
answers, with the volume trigger.

    .venv/bin/python bench/freshness_bench.py --rate 20 --duration-s 300 --volume-trigger 400

kt on CodeWorkout: the first half (assignment order) is the base data of a first version; then this process
posts the second half through POST /interactions (the app in process, FastAPI's TestClient) at --rate answers
a second, while a `gramrec trainer` process (the product's, GRAMREC_RETRAIN__VOLUME_TRIGGER, incremental mode)
retrains and activates; the app follows activations over Redis pub/sub. A watcher asks POST /predict every
--poll-s and notes when each version first answers. An answer is "trained on" by a version when its entry id is
in that version's (after, through] range (its job record) and its student is not in that version's gate slice
(trained_on.json; such answers are trained on by the next version). Its freshness: the first answer of the first
version that trained on it, minus the moment POST /interactions returned. Answers no version trained on by the
end are counted apart (censored), not in the percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis  # noqa: E402
from bench.replay_bench import AUTH, START, TOKEN, first_version  # noqa: E402
from bench.replay_data import kt_slices, kt_timestamp, write_kt_base  # noqa: E402
from gramrec.trainer.retrain.interaction_segments import entry_key  # noqa: E402

PREFIX = "fresh:"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="answers posted per second")
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long answers are posted")
    parser.add_argument("--drain-s", type=float, default=240.0, help="how long to wait after the last post")
    parser.add_argument("--volume-trigger", type=int, default=400)
    parser.add_argument("--time-budget-s", type=float, default=None, help="training seconds per retrain")
    parser.add_argument("--poll-s", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args(argv)


def worker_settings(args, redis_url: str, work: Path, base: Path):
    from gramrec.trainer.retrain.settings import WorkerSettings

    return WorkerSettings(
        redis_url=redis_url,
        redis_key_prefix=PREFIX,
        artifacts_dir=work / "artifacts",
        admin_token=TOKEN,
        tasks=["kt"],
        bootstrap=False,
        bootstrap_kt_data=base,
        bootstrap_device=args.device,
        bootstrap_train={"progress": False},
        model_poll_interval_s=1.0,
    )


def trainer_env(args, redis_url: str, work: Path, base: Path) -> dict[str, str]:
    env = {
        "REDIS_URL": redis_url,
        "GRAMREC_REDIS_KEY_PREFIX": PREFIX,
        "GRAMREC_ARTIFACTS_DIR": str(work / "artifacts"),
        "GRAMREC_TASKS": "kt",
        "GRAMREC_BOOTSTRAP": "false",
        "GRAMREC_BOOTSTRAP_KT_DATA": str(base),
        "GRAMREC_RETRAIN__TASKS": "kt",
        "GRAMREC_RETRAIN__MODE": "incremental",
        "GRAMREC_RETRAIN__VOLUME_TRIGGER": str(args.volume_trigger),
        "GRAMREC_RETRAIN__VOLUME_CHECK_S": "1",
        "GRAMREC_RETRAIN__POLL_S": "0.2",
        "GRAMREC_RETRAIN__INTERVAL_S": "86400",
        "GRAMREC_RETRAIN__GATE_TOLERANCE": "1.0",
        "GRAMREC_RETRAIN__DEVICE": args.device,
        "GRAMREC_RETRAIN__RETIRE_GRACE_S": "3600",
    }
    if args.time_budget_s:
        env["GRAMREC_RETRAIN__TIME_BUDGET_S"] = str(args.time_budget_s)
    return os.environ | env


class Watcher(threading.Thread):
    """Asks POST /predict every poll_s; first_seen: version -> when it first answered (time.time())."""

    def __init__(self, client, poll_s: float):
        super().__init__(daemon=True)
        self.client, self.poll_s = client, poll_s
        self.first_seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        body = {"task": "kt", "history": [], "targets": ["1"]}
        while not self.done.wait(self.poll_s):
            reply = self.client.post("/predict", json=body)
            if reply.status_code == 200:
                self.first_seen.setdefault(reply.json()["model_version"], time.time())


def freshness(
    posted: list[tuple[str, str, float]],
    jobs: list[dict],
    gate_units: dict[str, set[str]],
    first_seen: dict[str, float],
) -> tuple[list[float], int]:
    """(seconds per answer trained on and served, answers no served version trained on)."""
    served = sorted(
        (first_seen[j["version"]], j) for j in jobs if j.get("status") == "succeeded" and j["version"] in first_seen
    )
    delays, censored = [], 0
    for entry_id, user, posted_at in posted:
        key = entry_key(entry_id)
        for seen_at, job in served:
            inc = job["data"].get("increment") or {}
            after, through = inc.get("after"), inc.get("through") or job["data"].get("last_logged_id")
            newer = after is None or key > entry_key(after)
            if through and newer and key <= entry_key(through) and user not in gate_units[job["version"]]:
                delays.append(seen_at - posted_at)
                break
            if through and not newer and user in gate_units.get(job.get("base_version") or "", set()):
                delays.append(seen_at - posted_at)  # held out by the previous version, carried into this one
                break
        else:
            censored += 1
    return delays, censored


def main(argv=None) -> None:
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the private redis-server (finally blocks)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="freshness-"))
    texts, halves = kt_slices(args.codeworkout, 1)
    base = write_kt_base(work / "base", texts, halves[0])
    stream = halves[1][: int(args.rate * args.duration_s)]
    with private_redis() as url:
        settings = worker_settings(args, url, work, base)
        first = first_version(settings, "kt")
        log = open(work / "trainer.log", "w")
        trainer = subprocess.Popen(
            [sys.executable, "-m", "gramrec.trainer.cli", "trainer"],
            env=trainer_env(args, url, work, base),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        posted: list[tuple[str, str, float]] = []
        try:
            with TestClient(create_app(settings)) as client:
                watcher = Watcher(client, args.poll_s)
                watcher.start()
                started = time.time()
                for i, row in enumerate(stream):
                    time.sleep(max(0.0, started + i / args.rate - time.time()))
                    event = {"item_id": row.item, "correct": row.correct, "timestamp": kt_timestamp(START, i)}
                    reply = client.post("/interactions", json={"task": "kt", "user_id": row.user, "events": [event]})
                    reply.raise_for_status()
                    posted.append((reply.json()["ids"][0], row.user, time.time()))
                    if i % 500 == 0:
                        print(f"posted {i}/{len(stream)}; versions served: {len(watcher.first_seen)}", flush=True)
                time.sleep(args.drain_s)
                watcher.done.set()
                jobs = client.get("/admin/jobs", headers=AUTH, params={"limit": 500}).json()["jobs"]
        finally:
            trainer.terminate()
            trainer.wait(60)
    gate_units = {}
    for job in jobs:
        record = work / "artifacts" / "checkpoints" / str(job.get("version")) / "trained_on.json"
        gate_units[job.get("version")] = (
            set(json.loads(record.read_text())["gate_units"]) if record.is_file() else set()
        )
    delays, censored = freshness(posted, jobs, gate_units, watcher.first_seen)
    retrains = [j for j in jobs if j.get("status") == "succeeded"]
    result = {
        "first_version": first,
        "posted": len(posted),
        "trained_and_served": len(delays),
        "censored": censored,
        "p50_s": float(np.percentile(delays, 50)) if delays else None,
        "p90_s": float(np.percentile(delays, 90)) if delays else None,
        "retrains": len(retrains),
        "retrain_s": [
            round(sum(j["timings"].get(p, 0) for p in ("snapshot", "train", "gate", "export", "table", "activate")), 1)
            for j in retrains
        ],
        "jobs": [{k: j.get(k) for k in ("status", "trigger", "timings", "data", "error")} for j in jobs],
        "args": {k: str(v) for k, v in vars(args).items()},
        "host": platform.node(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
