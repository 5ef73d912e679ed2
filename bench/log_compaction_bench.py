"""The interaction log's compaction on real records: Redis memory vs Parquet bytes, compaction and read speed.

    .venv/bin/python bench/log_compaction_bench.py --entries 100000

Logs real records (MIND subset impressions as `nr` entries, CodeWorkout first attempts as `kt` entries, in the
fields POST /interactions writes; the files are cycled to reach --entries) into a private key prefix of the Redis at
--redis-url, then per task measures: the stream's Redis memory (MEMORY USAGE), one compaction run (segments of
--segment-entries, retention 0) with its entries/s, the segments' bytes, the stream length left, and the time to
read the whole log before (stream only) and after (segments + tail) compaction. Prints a markdown table and writes
JSON (--out). The prefix is deleted at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from itertools import cycle, islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 500  # entries per log_interactions call (one MULTI pipeline, as one POST /interactions batch is)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000, help="entries logged per task")
    parser.add_argument("--segment-entries", type=int, default=50_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--mind", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "log_compaction.json")
    return parser.parse_args(argv)


def kt_records(folder: Path):
    """CodeWorkout first attempts as POST /interactions logs them (one answer per entry)."""
    start = datetime(2019, 2, 1, tzinfo=UTC)
    with open(folder / "interactions_merged.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for n, row in enumerate(rows):
        yield {
            "user_id": row["SubjectID"],
            "item_id": row["ProblemID"],
            "correct": "1" if row["FirstAttemptCorrect"] in ("1", "True", "true") else "0",
            "timestamp": (start + timedelta(minutes=n)).isoformat(),
        }


def nr_records(folder: Path):
    """MIND impressions as POST /interactions logs them (one impression list per entry)."""
    with open(folder / "behaviors.tsv") as f:
        for line in f:
            _, user, moment, history, shown = line.rstrip("\n").split("\t")
            when = datetime.strptime(moment, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=UTC)
            yield {"user_id": user, "history": history, "impressions": shown, "timestamp": when.isoformat()}


def measure_task(store, client, task: str, records: list[dict], log_dir: Path, segment_entries: int) -> dict:
    from gramrec.trainer.retrain.log_compaction import compact_task
    from gramrec.trainer.retrain.snapshot import logged_entries

    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        store.log_interactions(task, records[start : start + BATCH])
        if (start // BATCH) % 40 == 0:
            done = start + BATCH
            rate = done / (time.perf_counter() - started)
            print(
                f"  {task}: logged {done:,}/{len(records):,} ({rate:,.0f}/s, ETA {(len(records) - done) / rate:.0f} s)"
            )
    log_s = time.perf_counter() - started
    key = store.key("interactions", task)
    redis_bytes = int(client.memory_usage(key, samples=0))

    started = time.perf_counter()
    before = sum(1 for _ in logged_entries(store, task))
    read_stream_s = time.perf_counter() - started

    started = time.perf_counter()
    stats = compact_task(store, log_dir, task, segment_entries, retention_s=0)
    compact_s = time.perf_counter() - started

    started = time.perf_counter()
    after = sum(1 for _ in logged_entries(store, task))
    read_segments_s = time.perf_counter() - started
    assert before == after == len(records), (before, after, len(records))
    return {
        "entries": len(records),
        "log_entries_per_s": round(len(records) / log_s),
        "redis_bytes_per_entry": round(redis_bytes / len(records), 1),
        "segment_bytes_per_entry": round(stats.segment_bytes / len(records), 1),
        "segments": stats.segments,
        "compacted": stats.compacted,
        "stream_length_after": stats.stream_length,
        "compact_s": round(compact_s, 3),
        "compact_entries_per_s": round(stats.compacted / compact_s),
        "read_stream_only_s": round(read_stream_s, 3),
        "read_segments_and_tail_s": round(read_segments_s, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    import redis

    from gramrec.service.store.redis_store import RedisStore

    args = parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"gramrec-bench-log-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(client, prefix)
    sources = {"kt": list(kt_records(args.codeworkout)), "nr": list(nr_records(args.mind))}
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/log_compaction_bench.py " + " ".join(argv or sys.argv[1:]),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "loadavg": _loadavg()},
        "redis": client.info("server").get("redis_version"),
        "segment_entries": args.segment_entries,
        "tasks": {},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for task, rows in sources.items():
                records = list(islice(cycle(rows), args.entries))
                results["tasks"][task] = measure_task(store, client, task, records, Path(tmp), args.segment_entries)
    finally:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.unlink(key)
        client.close()
    results["host"]["loadavg_after"] = _loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


def table(results: dict) -> str:
    keys = list(next(iter(results["tasks"].values())))
    lines = ["| task | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for task, row in results["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[k]:,}" for k in keys) + " |")
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
