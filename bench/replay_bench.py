"""Replay benchmark (issue 14): real data streamed through the real API, a retrain after each chunk, incremental
and full mode side by side.

    .venv/bin/python bench/replay_bench.py --task kt --chunks 6
    .venv/bin/python bench/replay_bench.py --task nr --chunks 3 --per-day 150 --time-budget-s 120
    .venv/bin/python bench/replay_bench.py --task kt --chunks 4 --segment-entries 1000 --stream-retention-s 5
    python3 bench/replay_bench.py --task nr --store sqlite --device cuda --encoder-dir .carry/minilm   # GPU host

Data (bench/replay_data.py): kt: CodeWorkout in assignment order, base = the first of `chunks + 1` equal slices;
nr: the MIND subset by day, base = the first --base-days days (at least 3: a first start splits its data by day
into train, validation and test), one chunk per later day (11/12, 11/13, 11/14 by default). Each mode gets its
own private redis-server (bench/private_redis.py: INFO counts this run alone; or with --store sqlite the embedded
store, one file per mode, as on a host without Redis) and artifacts folder, and the same start: a first version
trained on the base data (GRAM-1E for kt, NoFinetune for nr, as a first start does) with all-MiniLM-L6-v2.
Then, per chunk: the chunk goes in through POST /interactions (the app in process, FastAPI's TestClient), then
POST /admin/retrain {mode}, then the trainer runs that job (TrainerWorker.work_once, in process: the same code
as `gramrec trainer`), then, once the API serves the new version, the served model's metric on the NEXT chunk
through POST /predict (kt: AUC of each next-chunk answer given the student's answers so far; nr: mean AUC over
next-day impressions with a history and both labels). Recorded per retrain: the job's phase timings, its counts,
the store's size (Redis used_memory; sqlite: the file's bytes), the stream's length and the log's Parquet
segments after the retrain's compaction (--segment-entries, --stream-retention-s: the log stays bounded while
history grows), bytes Redis received (total_net_input_bytes) from ingest through retrain.
Prints a markdown table; writes JSON (--out, after every retrain, so a run cut short keeps what it did) and a
figure (--figure): retrain time and next-chunk metric against history size, both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis, redis_counters  # noqa: E402
from bench.replay_data import (  # noqa: E402
    kt_slices,
    kt_timestamp,
    mind_days,
    write_kt_base,
    write_mind_base,
)

TOKEN = "replay-bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START = datetime(2026, 12, 1, tzinfo=UTC)
PHASES = ["snapshot", "train", "gate", "export", "table", "activate"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["kt", "nr"], default="kt")
    parser.add_argument(
        "--chunks", type=int, default=None, help="kt: slices after the base (6); nr: days after the base (all left)"
    )
    parser.add_argument("--per-day", type=int, default=150, help="nr: impressions per day")
    parser.add_argument("--base-days", type=int, default=3, help="nr: days of the base data from 11/9 (>= 3)")
    parser.add_argument("--modes", nargs="+", choices=["incremental", "full"], default=["incremental", "full"])
    parser.add_argument("--epochs", type=int, default=1, help="GRAM-1E epochs per retrain (and of the first model)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="training seconds per retrain")
    parser.add_argument("--gate-tolerance", type=float, default=1.0, help="1.0: always promote (not measured here)")
    parser.add_argument("--replay-ratio", type=float, default=1.0)
    parser.add_argument("--replay-min", type=int, default=200)
    parser.add_argument("--context-answers", type=int, default=100, help="kt incremental: older answers per student")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder-dir", type=Path, default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--mind", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    parser.add_argument("--store", choices=["redis", "sqlite"], default="redis", help="sqlite: no Redis needed")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private one")
    parser.add_argument("--segment-entries", type=int, default=50_000, help="interaction-log entries per segment")
    parser.add_argument(
        "--stream-retention-s", type=float, default=3600.0, help="compacted entries stay in the store this long"
    )
    parser.add_argument(
        "--compact-interval-s", type=float, default=60.0, help="idle compaction period (each retrain compacts first)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--figure", type=Path, default=None, help="PNG: time and metric against history size")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.chunks is None:
        args.chunks = 6 if args.task == "kt" else 6 - args.base_days
    return args


# -- data -------------------------------------------------------------------------------------------------------------
class KTStream:
    """CodeWorkout slices, fed as answer events per student, and scored as next-answer predictions."""

    task = "kt"

    def __init__(self, args):
        self.texts, self.slices = kt_slices(args.codeworkout, args.chunks)
        self.history: dict[str, list[dict]] = {}  # the answers each student has given so far (base and streamed)
        for row in self.slices[0]:
            self.history.setdefault(row.user, []).append({"item_id": row.item, "correct": row.correct})
        self.sent = 0

    def write_base(self, folder: Path) -> Path:
        return write_kt_base(folder, self.texts, self.slices[0])

    def chunk_size(self, k: int) -> int:
        return len(self.slices[k])

    def feed(self, client, k: int) -> None:
        by_user: dict[str, list[dict]] = {}
        for row in self.slices[k]:
            by_user.setdefault(row.user, []).append(
                {"item_id": row.item, "correct": row.correct, "timestamp": kt_timestamp(START, self.sent)}
            )
            self.sent += 1
        for user, events in by_user.items():
            response = client.post("/interactions", json={"task": "kt", "user_id": user, "events": events})
            response.raise_for_status()
            self.history.setdefault(user, []).extend({k: e[k] for k in ("item_id", "correct")} for e in events)

    def metric(self, client, k: int) -> tuple[float, set[str]]:
        """AUC over chunk k's answers, each predicted from the student's answers before chunk k."""
        from gramrec.trainer.metrics import auc

        labels, scores, versions = [], [], set()
        by_user: dict[str, list] = {}
        for row in self.slices[k]:
            by_user.setdefault(row.user, []).append(row)
        for user, rows in by_user.items():
            history = self.history.get(user, [])[-1000:]
            for start in range(0, len(rows), 200):
                part = rows[start : start + 200]
                body = {"task": "kt", "history": history, "targets": [r.item for r in part]}
                answer = client.post("/predict", json=body)
                answer.raise_for_status()
                reply = answer.json()
                versions.add(reply["model_version"])
                scores += [p["probability"] for p in reply["predictions"]]
                labels += [r.correct for r in part]
        return auc(np.array(labels), np.array(scores)), versions

    def history_size(self, k: int) -> int:
        return sum(len(s) for s in self.slices[: k + 1])


class NRStream:
    """MIND days, fed as impressions, scored as next-day click ranking."""

    task = "nr"

    def __init__(self, args):
        if args.base_days < 3 or args.base_days + args.chunks > 6:
            raise SystemExit("nr: --base-days >= 3 and --base-days + --chunks <= 6 (the subset spans 11/9 to 11/14)")
        self.news, days = mind_days(args.mind, args.per_day, args.base_days - 1 + args.chunks)
        self.slices = [[imp for day in days[: args.base_days] for imp in day], *days[args.base_days :]]

    def write_base(self, folder: Path) -> Path:
        return write_mind_base(folder, self.news, self.slices[0])

    def chunk_size(self, k: int) -> int:
        return len(self.slices[k])

    def feed(self, client, k: int) -> None:
        for imp in self.slices[k]:
            body = {
                "task": "nr",
                "user_id": imp.user,
                "history": imp.history[-1000:],
                "impressions": [{"item_id": nid, "clicked": label} for nid, label in imp.shown][:1000],
                "timestamp": imp.time.replace(tzinfo=UTC).isoformat(),
            }
            client.post("/interactions", json=body).raise_for_status()

    def metric(self, client, k: int) -> tuple[float, set[str]]:
        from gramrec.trainer.metrics import auc

        values, versions = [], set()
        for imp in self.slices[k]:
            labels = [label for _, label in imp.shown]
            if not imp.history or len(set(labels)) < 2:
                continue
            body = {"task": "nr", "history": imp.history[-1000:], "candidates": [n for n, _ in imp.shown][:500]}
            answer = client.post("/predict", json=body)
            answer.raise_for_status()
            reply = answer.json()
            versions.add(reply["model_version"])
            score = {s["item_id"]: s["score"] for s in reply["scores"]}
            values.append(auc(np.array(labels[:500]), np.array([score[n] for n, _ in imp.shown][:500])))
        return float(np.mean(values)), versions

    def history_size(self, k: int) -> int:
        return sum(len(s) for s in self.slices[: k + 1])


# -- one mode ---------------------------------------------------------------------------------------------------------
def settings_for(args, mode: str, redis_url: str | None, work: Path, base: Path):
    """redis_url None: the embedded sqlite store, one file per mode (what a host without Redis runs)."""
    from gramrec.trainer.retrain.settings import WorkerSettings

    train = {"progress": False} | ({"encoder_dir": str(args.encoder_dir)} if args.encoder_dir else {})
    return WorkerSettings(
        redis_url=redis_url,
        redis_key_prefix=f"replay-{mode}:",
        embedded_store_path=work / mode / "store.sqlite3",
        artifacts_dir=work / mode / "artifacts",
        admin_token=TOKEN,
        tasks=[args.task],
        bootstrap=False,
        bootstrap_kt_data=base,
        bootstrap_nr_data=base,
        bootstrap_epochs=args.epochs,
        bootstrap_device=args.device,
        bootstrap_train=train,
        model_poll_interval_s=0.2,
        retrain={
            "tasks": [args.task],
            "mode": mode,
            "epochs": args.epochs,
            "time_budget_s": args.time_budget_s,
            "device": args.device,
            "gate_tolerance": args.gate_tolerance,
            "replay_ratio": args.replay_ratio,
            "replay_min": args.replay_min,
            "context_answers": args.context_answers,
            "keep_versions": 2,
            "retire_grace_s": 0,
            "segment_entries": args.segment_entries,
            "stream_retention_s": args.stream_retention_s,
            "compact_interval_s": args.compact_interval_s,
        },
    )


def store_counters(store, settings, task: str) -> dict:
    """The store's size, the bytes it received so far (Redis only), the stream's length, the log's segments."""
    from gramrec.trainer.retrain.log_compaction import log_stats

    if settings.redis_url:
        counters = redis_counters(settings.redis_url, f"{settings.redis_key_prefix}interactions:{task}")
    else:
        path = Path(settings.embedded_store_path)
        files = [path, path.with_name(path.name + "-wal")]
        counters = {"used_memory": sum(f.stat().st_size for f in files if f.exists()), "net_input_bytes": None}
        counters["stream_length"] = store.count_interactions(task)
    stats = log_stats(store, settings.interaction_log_dir(), task)
    return counters | {"segments": stats.segments, "segment_bytes": stats.segment_bytes}


def first_version(settings, task: str) -> str:
    from gramrec.trainer.bootstrap import train_export_and_activate

    return train_export_and_activate(settings, task)


def served(stream, client, k: int, expected: str, timeout_s: float = 120.0) -> float:
    """The next-chunk metric, all of it answered by `expected` (the API swaps within a poll interval)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metric, versions = stream.metric(client, k)
        if versions == {expected}:
            return metric
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API served {versions}, not {expected}")
        time.sleep(0.5)


def run_mode(
    args, stream, mode: str, redis_url: str | None, work: Path, base: Path, report: Callable[[list[dict]], None]
) -> list[dict]:
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app
    from gramrec.service.store import open_store
    from gramrec.trainer.retrain.worker import TrainerWorker

    settings = settings_for(args, mode, redis_url, work, base)
    started = time.perf_counter()
    version = first_version(settings, args.task)
    print(f"[{mode}] first version {version} in {time.perf_counter() - started:.0f} s", flush=True)
    store = open_store(settings)
    worker = TrainerWorker(settings, store)
    rows = []
    with TestClient(create_app(settings)) as client:
        baseline = served(stream, client, 1, version)
        rows.append({"mode": mode, "chunk": 0, "history": stream.history_size(0), "next_metric": baseline})
        report(rows)
        for k in range(1, len(stream.slices)):
            before = store_counters(store, settings, args.task)
            tick = time.perf_counter()
            stream.feed(client, k)
            ingest_s = time.perf_counter() - tick
            ingested = store.count_interactions(args.task)  # the stream before this retrain's compaction
            reply = client.post("/admin/retrain", json={"task": args.task, "mode": mode}, headers=AUTH)
            reply.raise_for_status()
            cpu = time.process_time()
            job = worker.work_once()
            cpu_s = time.process_time() - cpu  # this process's CPU seconds: less hostage to a shared CPU's load
            assert job is not None and job["id"] == reply.json()["id"], job
            after = store_counters(store, settings, args.task)
            if job["status"] != "succeeded":
                raise RuntimeError(f"retrain {k} ({mode}): {job['status']}: {job.get('error')} {job.get('metrics')}")
            row = {
                "mode": mode,
                "chunk": k,
                "history": stream.history_size(k),
                "chunk_size": stream.chunk_size(k),
                "ingest_s": round(ingest_s, 2),
                "timings": job["timings"],
                "retrain_s": round(sum(job["timings"].get(p, 0.0) for p in PHASES), 2),
                "retrain_cpu_s": round(cpu_s, 2),
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
                "data": job["data"],
                "gate": job["metrics"],
                "store": "redis" if settings.redis_url else "sqlite",
                "redis_used_memory": after["used_memory"],  # sqlite: the store file's bytes
                "stream_after_ingest": ingested,
                "stream_length": after["stream_length"],  # after the retrain (it compacts before its snapshot)
                "segments": after["segments"],
                "segment_bytes": after["segment_bytes"],
                "redis_bytes_in": (
                    after["net_input_bytes"] - before["net_input_bytes"] if settings.redis_url else None
                ),
            }
            if k + 1 < len(stream.slices):
                row["next_metric"] = served(stream, client, k + 1, job["version"])
            rows.append(row)
            report(rows)
            print(
                f"[{mode}] chunk {k}: "
                + json.dumps(
                    {key: row[key] for key in ("history", "retrain_s", "stream_length", "segments")}
                    | {"timings": job["timings"], "next": row.get("next_metric")}
                ),
                flush=True,
            )
    store.close()
    return rows


# -- report -----------------------------------------------------------------------------------------------------------
def table(rows: list[dict], task: str) -> str:
    metric = "AUC" if task == "kt" else "mean impression AUC"
    head = (
        f"| mode | chunk | history | retrain s | CPU s | load | {' | '.join(PHASES)} | trained on | train steps | items encoded | "
        f"next-chunk {metric} | store MB | stream length: ingested → retrained | segments | MB in |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["chunk"] == 0:
            lines.append(
                f"| {r['mode']} | base | {r['history']} |"
                + " |" * (len(PHASES) + 6)
                + f" {r['next_metric']:.4f} | | | | |"
            )
            continue
        data = r["data"]
        inc = data.get("increment")
        if inc:  # kt keeps older answers as context; nr impressions stand alone
            context = f"{inc['context_interactions']} ctx + " if "context_interactions" in inc else ""
            carried = f"{inc['carried_units']} carried + " if inc.get("carried_units") else ""
            trained = (
                f"{inc['new_interactions']} new + {context}{carried}"
                f"{inc['replay_interactions']} replay ({inc['replay_units']} units)"
            )
        else:
            trained = f"{data['base_interactions']} base + {data['logged_interactions']} logged"
        nxt = f"{r['next_metric']:.4f}" if "next_metric" in r else "-"
        bytes_in = "-" if r.get("redis_bytes_in") is None else f"{r['redis_bytes_in'] / 1e6:.2f}"
        lines.append(
            f"| {r['mode']} | {r['chunk']} | {r['history']} | {r['retrain_s']:.1f} | {r['retrain_cpu_s']:.1f} | "
            f"{r['loadavg']} | "
            + " | ".join(f"{r['timings'].get(p, 0):.1f}" for p in PHASES)
            + f" | {trained} | {data.get('train', {}).get('steps', '-')} | {data.get('items_encoded_at_start')} | {nxt} | {r['redis_used_memory'] / 1e6:.1f} | "
            f"{r.get('stream_after_ingest', '-')} → {r['stream_length']} | {r.get('segments', '-')} | {bytes_in} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, log) = plt.subplots(1, 3, figsize=(15, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        trained = [r for r in mine if r["chunk"] > 0]
        left.plot([r["history"] for r in trained], [r["retrain_s"] for r in trained], marker="o", label=f"{mode} wall")
        left.plot(
            [r["history"] for r in trained],
            [r["retrain_cpu_s"] for r in trained],
            ls="--",
            marker="x",
            label=f"{mode} CPU",
        )
        scored = [r for r in mine if "next_metric" in r]
        right.plot([r["history"] for r in scored], [r["next_metric"] for r in scored], marker="o", label=mode)
        log.plot([r["history"] for r in trained], [r["stream_length"] for r in trained], marker="o", label=mode)
    unit = "answers" if task == "kt" else "impressions"
    left.set(xlabel=f"history ({unit})", ylabel="retrain seconds (wall, CPU)", title=f"{task}: retrain time")
    right.set(xlabel=f"history ({unit})", ylabel="next-chunk AUC", title=f"{task}: served model on the next chunk")
    log.plot([r["history"] for r in rows], [r["history"] for r in rows], ls=":", color="grey", label="history")
    log.set(xlabel=f"history ({unit})", ylabel="entries in the store", title=f"{task}: stream after each retrain")
    log.set_ylim(bottom=0)
    for ax in (left, right, log):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_meta(args, started: float) -> dict:
    import torch

    return {
        "task": args.task,
        "store": args.store if not args.redis_url else "redis",
        "args": {k: str(v) for k, v in vars(args).items()},
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "date": datetime.now(UTC).isoformat(),
    }


def write_results(args, meta: dict, rows: list[dict]) -> None:
    """JSON (and the figure) of every row so far: a run stopped by a time limit keeps its finished retrains."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.figure and any(r["chunk"] > 0 for r in rows):
        figure(rows, args.task, args.figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the private redis-server (finally blocks)
    stream_type = KTStream if args.task == "kt" else NRStream
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"replay-{args.task}-"))
    rows: list[dict] = []
    started = time.perf_counter()

    def report(mode_rows: list[dict]) -> None:  # the modes done, then the one running
        write_results(args, run_meta(args, started), rows + mode_rows)

    for mode in args.modes:
        stream = stream_type(args)  # each mode replays the same stream from its start
        base = stream.write_base(work / "base")
        if args.redis_url:
            rows += run_mode(args, stream, mode, args.redis_url, work, base, report)
        elif args.store == "sqlite":
            rows += run_mode(args, stream, mode, None, work, base, report)
        else:
            with private_redis() as url:
                rows += run_mode(args, stream, mode, url, work, base, report)
    print(table(rows, args.task))
    meta = run_meta(args, started)
    print(json.dumps(meta))
    write_results(args, meta, rows)
    return rows


if __name__ == "__main__":
    main()
