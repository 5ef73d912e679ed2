"""Freshness (issue 14): seconds from POST /interactions until a served model that trained on that interaction
answers, with the volume trigger.

    .venv/bin/python bench/freshness_bench.py --rate 20 --duration-s 300 --volume-trigger 400
    python3 bench/freshness_bench.py --task nr --store sqlite --device cuda --encoder-dir .carry/minilm \
        --mind .carry/data/mind_small_subset --rate 10 --duration-s 150 --volume-trigger 150   # GPU host

kt: CodeWorkout, the first half (assignment order) is the base data of a first version (GRAM-1E); the second
half is posted answer by answer. nr: the MIND subset, the first --base-days days are the base data of a first
version (NoFinetune, as a first start trains it), the later days' impressions (time order) are posted one by one.
This process posts them through POST /interactions (the app in process, FastAPI's TestClient) at --rate a second,
while a `gramrec trainer` process (the product's, started as `sys.executable -m gramrec.trainer.cli trainer` with
this process's environment, GRAMREC_RETRAIN__VOLUME_TRIGGER, incremental mode) retrains and activates. With
Redis (--store redis, a private redis-server) the app follows activations over pub/sub; with --store sqlite (the
embedded store, no Redis: one sqlite file shared by the two processes) it polls the store every --poll-s.
A watcher asks POST /predict every --poll-s and notes when each version first answers. An interaction is
"trained on" by a version when its entry id is in that version's (after, through] range (its job record) and its
unit (kt: the student; nr: the impression, `L<entry id>`) is not in that version's gate slice (trained_on.json;
such interactions are trained on by the next version). Its freshness: the first answer of the first version that
trained on it, minus the moment POST /interactions returned. Interactions no version trained on by the end are
counted apart (censored), not in the percentiles.
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
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis  # noqa: E402
from bench.replay_bench import AUTH, START, TOKEN, first_version  # noqa: E402
from bench.replay_data import kt_slices, kt_timestamp, mind_days, write_kt_base, write_mind_base  # noqa: E402
from gramrec.trainer.retrain.interaction_segments import entry_key  # noqa: E402

PREFIX = "fresh:"
PHASES = ("snapshot", "train", "gate", "export", "table", "activate")


@dataclass
class Plan:
    """What one run posts: the base data folder, the /interactions bodies in posting order, and the watcher's
    /predict body."""

    base: Path
    posts: list[dict]
    probe: dict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["kt", "nr"], default="kt")
    parser.add_argument("--store", choices=["redis", "sqlite"], default="redis", help="sqlite: no Redis needed")
    parser.add_argument("--rate", type=float, default=20.0, help="answers (kt) or impressions (nr) posted a second")
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long answers are posted")
    parser.add_argument("--drain-s", type=float, default=240.0, help="how long to wait after the last post")
    parser.add_argument(
        "--until-retrains", type=int, default=None, help="end the drain early once this many retrained versions served"
    )
    parser.add_argument("--volume-trigger", type=int, default=400)
    parser.add_argument("--time-budget-s", type=float, default=None, help="training seconds per retrain")
    parser.add_argument("--poll-s", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder-dir", type=Path, default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--mind", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    parser.add_argument("--base-days", type=int, default=4, help="nr: days of the base data from 11/9, 3 to 5")
    parser.add_argument("--per-day", type=int, default=5000, help="nr: at most this many impressions a day")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args(argv)


def kt_plan(args, work: Path) -> Plan:
    """CodeWorkout: first half the base, then the second half's answers one by one."""
    texts, halves = kt_slices(args.codeworkout, 1)
    base = write_kt_base(work / "base", texts, halves[0])
    posts = [
        {
            "task": "kt",
            "user_id": row.user,
            "events": [{"item_id": row.item, "correct": row.correct, "timestamp": kt_timestamp(START, i)}],
        }
        for i, row in enumerate(halves[1])
    ]
    return Plan(base, posts, {"task": "kt", "history": [], "targets": [halves[0][0].item]})


def nr_plan(args, work: Path) -> Plan:
    """The MIND subset: the first --base-days days the base, then the later days' impressions in time order."""
    if not 3 <= args.base_days <= 5:  # a first start splits its data by day: train, validation, test
        raise SystemExit("--base-days: 3 to 5 (the subset spans 11/9 to 11/14)")
    news, days = mind_days(args.mind, args.per_day, 5)
    base = write_mind_base(work / "base", news, [imp for day in days[: args.base_days] for imp in day])
    posts = [
        {
            "task": "nr",
            "user_id": imp.user,
            "history": imp.history[-1000:],
            "impressions": [{"item_id": nid, "clicked": label} for nid, label in imp.shown][:1000],
            "timestamp": imp.time.replace(tzinfo=UTC).isoformat(),
        }
        for day in days[args.base_days :]
        for imp in day
    ]
    some = next(iter(news))
    return Plan(base, posts, {"task": "nr", "history": [some], "candidates": [some]})


def unit_of(post: dict, entry_id: str) -> str:
    """What the gate holds out: the student (kt), the logged impression (nr, as the snapshot names it)."""
    return post["user_id"] if post["task"] == "kt" else f"L{entry_id}"


def worker_settings(args, redis_url: str | None, work: Path, base: Path):
    from gramrec.trainer.retrain.settings import WorkerSettings

    train = {"progress": False} | ({"encoder_dir": str(args.encoder_dir)} if args.encoder_dir else {})
    return WorkerSettings(
        redis_url=redis_url,
        redis_key_prefix=PREFIX,
        embedded_store_path=work / "store.sqlite3",
        artifacts_dir=work / "artifacts",
        admin_token=TOKEN,
        tasks=[args.task],
        bootstrap=False,
        bootstrap_kt_data=base,
        bootstrap_nr_data=base,
        bootstrap_device=args.device,
        bootstrap_train=train,
        # Redis: activations arrive over pub/sub, the poll is a fallback; sqlite has no pub/sub: the poll is it.
        model_poll_interval_s=1.0 if redis_url else args.poll_s,
    )


def trainer_env(args, settings) -> dict[str, str]:
    """The trainer's environment: this process's (PYTHONPATH too: gramrec need not be installed), the store's
    settings, incremental retrains on the volume trigger."""
    env = {
        "GRAMREC_REDIS_KEY_PREFIX": PREFIX,
        "GRAMREC_EMBEDDED_STORE_PATH": str(settings.embedded_store_path),
        "GRAMREC_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "GRAMREC_TASKS": args.task,
        "GRAMREC_BOOTSTRAP": "false",
        f"GRAMREC_BOOTSTRAP_{args.task.upper()}_DATA": str(settings.bootstrap_data(args.task)),
        "GRAMREC_MODEL_POLL_INTERVAL_S": str(settings.model_poll_interval_s),
        "GRAMREC_RETRAIN__TASKS": args.task,
        "GRAMREC_RETRAIN__MODE": "incremental",
        "GRAMREC_RETRAIN__VOLUME_TRIGGER": str(args.volume_trigger),
        "GRAMREC_RETRAIN__VOLUME_CHECK_S": "1",
        "GRAMREC_RETRAIN__POLL_S": "0.2",
        "GRAMREC_RETRAIN__INTERVAL_S": "86400",
        "GRAMREC_RETRAIN__GATE_TOLERANCE": "1.0",
        "GRAMREC_RETRAIN__DEVICE": args.device,
        "GRAMREC_RETRAIN__RETIRE_GRACE_S": "3600",
    }
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    if args.time_budget_s:
        env["GRAMREC_RETRAIN__TIME_BUDGET_S"] = str(args.time_budget_s)
    inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GRAMREC_REDIS_URL")}
    return inherited | env


@contextmanager
def store_url(args):
    """A private redis-server's URL, or None: the embedded sqlite store."""
    if args.store == "sqlite":
        yield None
    else:
        with private_redis() as url:
            yield url


class Watcher(threading.Thread):
    """Asks POST /predict every poll_s; first_seen: version -> when it first answered (time.time())."""

    def __init__(self, client, poll_s: float, probe: dict):
        super().__init__(daemon=True)
        self.client, self.poll_s, self.probe = client, poll_s, probe
        self.first_seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.poll_s):
            reply = self.client.post("/predict", json=self.probe)
            if reply.status_code == 200:
                self.first_seen.setdefault(reply.json()["model_version"], time.time())


def freshness(
    posted: list[tuple[str, str, float]],  # (entry id, unit, when POST /interactions returned)
    jobs: list[dict],
    gate_units: dict[str, set[str]],
    first_seen: dict[str, float],
) -> tuple[list[float], int]:
    """(seconds per answer trained on and served, answers no served version trained on)."""
    served = sorted(
        (first_seen[j["version"]], j) for j in jobs if j.get("status") == "succeeded" and j["version"] in first_seen
    )
    delays, censored = [], 0
    for entry_id, unit, posted_at in posted:
        key = entry_key(entry_id)
        for seen_at, job in served:
            inc = job["data"].get("increment") or {}
            after, through = inc.get("after"), inc.get("through") or job["data"].get("last_logged_id")
            newer = after is None or key > entry_key(after)
            if through and newer and key <= entry_key(through) and unit not in gate_units[job["version"]]:
                delays.append(seen_at - posted_at)
                break
            if through and not newer and unit in gate_units.get(job.get("base_version") or "", set()):
                delays.append(seen_at - posted_at)  # held out by the previous version, carried into this one
                break
        else:
            censored += 1
    return delays, censored


def post_stream(client, plan: Plan, args, watcher: Watcher, trainer: subprocess.Popen) -> list[tuple[str, str, float]]:
    """Posts the plan's interactions at --rate for at most --duration-s; (entry id, unit, posted at) each."""
    posts = plan.posts[: int(args.rate * args.duration_s)]
    posted: list[tuple[str, str, float]] = []
    started = time.time()
    for i, body in enumerate(posts):
        time.sleep(max(0.0, started + i / args.rate - time.time()))
        reply = client.post("/interactions", json=body)
        reply.raise_for_status()
        entry_id = reply.json()["ids"][0]
        posted.append((entry_id, unit_of(body, entry_id), time.time()))
        if i % 500 == 0:
            print(f"posted {i}/{len(posts)}; versions served: {len(watcher.first_seen)}", flush=True)
            if trainer.poll() is not None:
                raise RuntimeError(f"the trainer exited with {trainer.returncode}")
    return posted


def drain(watcher: Watcher, args) -> None:
    """Waits --drain-s after the last post (or until --until-retrains versions after the first one served)."""
    deadline = time.monotonic() + args.drain_s
    while time.monotonic() < deadline:
        if args.until_retrains is not None and len(watcher.first_seen) > args.until_retrains:
            return
        time.sleep(0.5)


def main(argv=None) -> dict:
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the private redis-server (finally blocks)
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"freshness-{args.task}-"))
    plan = (kt_plan if args.task == "kt" else nr_plan)(args, work)
    jobs: list[dict] = []
    with store_url(args) as url:
        settings = worker_settings(args, url, work, plan.base)
        started = time.perf_counter()
        first = first_version(settings, args.task)
        print(f"first version {first} in {time.perf_counter() - started:.0f} s", flush=True)
        log = open(work / "trainer.log", "w")
        trainer = subprocess.Popen(
            [sys.executable, "-m", "gramrec.trainer.cli", "trainer"],
            env=trainer_env(args, settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with TestClient(create_app(settings)) as client:
                watcher = Watcher(client, args.poll_s, plan.probe)
                watcher.start()
                posted = post_stream(client, plan, args, watcher, trainer)
                drain(watcher, args)
                watcher.done.set()
                jobs = client.get("/admin/jobs", headers=AUTH, params={"limit": 500}).json()["jobs"]
        finally:
            trainer.terminate()  # it finishes the job in progress first
            try:
                trainer.wait(120)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait()
            log.close()
    gate_units = {}
    for job in jobs:
        record = work / "artifacts" / "checkpoints" / str(job.get("version")) / "trained_on.json"
        gate_units[job.get("version")] = (
            set(json.loads(record.read_text())["gate_units"]) if record.is_file() else set()
        )
    delays, censored = freshness(posted, jobs, gate_units, watcher.first_seen)
    retrains = [j for j in jobs if j.get("status") == "succeeded"]
    if not retrains:
        print("no retrain succeeded; the trainer's log ends:\n" + (work / "trainer.log").read_text()[-4000:])
    result = {
        "task": args.task,
        "store": args.store,
        "first_version": first,
        "posted": len(posted),
        "trained_and_served": len(delays),
        "censored": censored,
        "p50_s": float(np.percentile(delays, 50)) if delays else None,
        "p90_s": float(np.percentile(delays, 90)) if delays else None,
        "retrains": len(retrains),
        "retrain_s": [round(sum(j["timings"].get(p, 0) for p in PHASES), 1) for j in retrains],
        "jobs": [{k: j.get(k) for k in ("status", "trigger", "timings", "data", "error")} for j in jobs],
        "args": {k: str(v) for k, v in vars(args).items()},
        "host": platform.node(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    } | device_info()
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


def device_info() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
