"""The interaction log's compaction into Parquet segments: what it writes and trims, that readers see every
acknowledged entry exactly once, and that a compaction process SIGKILLed at each phase (then restarted) loses and
duplicates nothing, on both stores and across a Redis restart with AOF."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gramrec.service.store import open_store
from gramrec.trainer.retrain import log_compaction
from gramrec.trainer.retrain.interaction_segments import SegmentError, entry_key, list_segments
from gramrec.trainer.retrain.log_compaction import PHASES, compact_task
from gramrec.trainer.retrain.snapshot import build_snapshot, logged_entries
from gramrec.trainer.retrain.worker import TrainerWorker
from tests.helpers.fakes import drop_prefix
from tests.helpers.redis_server import RedisServer
from tests.helpers.retrain_data import write_kt_data

SEGMENT = 10


def answers(start: int, n: int) -> list[dict[str, str]]:
    return [
        {"user_id": f"s{i % 7}", "item_id": f"q{i % 16}", "correct": str(i % 2), "timestamp": f"2026-11-23T10:{i % 60:02d}:00+00:00"}
        for i in range(start, start + n)
    ]


def acknowledged(store, records) -> list[tuple[str, dict[str, str]]]:
    """What POST /interactions acknowledges: the ids the store returned, with what they hold."""
    return list(zip(store.log_interactions("kt", records), records, strict=True))


def full_log(store) -> list[tuple[str, dict[str, str]]]:
    return list(logged_entries(store, "kt"))


@pytest.fixture(params=["redis", "embedded"])
def store_and_settings(request, settings_for):
    settings = settings_for(request.param)
    store = open_store(settings)
    yield store, settings
    store.close()


def test_compaction_writes_full_segments_trims_and_every_entry_is_read_once(store_and_settings, tmp_path):
    store, _ = store_and_settings
    logged = acknowledged(store, answers(0, 25))
    stats = compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)

    segments = list_segments(tmp_path / "log" / "kt")
    assert [(s.first, s.last) for s in segments] == [(logged[0][0], logged[9][0]), (logged[10][0], logged[19][0])]
    assert (stats.compacted, stats.trimmed, stats.stream_length, stats.segments) == (20, 20, 5, 2)
    assert stats.segment_bytes == sum(s.bytes for s in segments) > 0
    assert full_log(store) == logged
    assert list(logged_entries(store, "kt", after=logged[12][0])) == logged[13:]  # mid-segment
    assert list(logged_entries(store, "kt", after=logged[21][0])) == logged[22:]  # in the live tail

    again = compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)  # idempotent: nothing new to do
    assert (again.compacted, again.trimmed, again.segments) == (0, 0, 2)
    assert full_log(store) == logged


def test_retention_keeps_compacted_entries_in_the_store_and_readers_skip_them(store_and_settings, tmp_path):
    store, _ = store_and_settings
    logged = acknowledged(store, answers(0, 25))
    stats = compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=3600)
    assert (stats.compacted, stats.trimmed, stats.stream_length) == (20, 0, 25)
    assert full_log(store) == logged


def test_a_snapshot_reads_segments_and_the_tail(settings_for, tmp_path):
    store = open_store(settings_for("redis"))
    base = write_kt_data(tmp_path / "kt")
    acknowledged(store, answers(0, 25))
    before = build_snapshot("kt", base, store, tmp_path / "before", gate_fraction=0.1)
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
    after = build_snapshot("kt", base, store, tmp_path / "after", gate_fraction=0.1)
    assert after.summary() == before.summary() and after.logged_interactions == 25
    assert (tmp_path / "after" / "interactions.csv").read_text() == (tmp_path / "before" / "interactions.csv").read_text()
    store.close()


def test_a_second_segment_folder_is_refused(store_and_settings, tmp_path):
    store, _ = store_and_settings
    acknowledged(store, answers(0, 12))
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
    with pytest.raises(SegmentError, match="segments are in"):
        compact_task(store, tmp_path / "elsewhere", "kt", SEGMENT, retention_s=0)


def test_entry_ids_compare_as_the_stores_issue_them():
    assert entry_key("1700000000000-10") > entry_key("1700000000000-9") > entry_key("999999999999-99")
    assert entry_key("10") > entry_key("9")
    with pytest.raises(SegmentError, match="not a log entry id"):
        entry_key("abc")


def test_the_trainer_compacts_on_its_loop(settings_for, tmp_path):
    settings = settings_for(
        "embedded", tasks=["kt"],
        retrain={"segment_entries": 5, "stream_retention_s": 0, "compact_interval_s": 3600, "log_dir": tmp_path / "log"},
    )
    store = open_store(settings)
    logged = acknowledged(store, answers(0, 12))
    worker = TrainerWorker(settings, store)
    assert worker.work_once() is None  # no job: an idle run compacts
    assert len(list_segments(tmp_path / "log" / "kt")) == 2 and store.count_interactions("kt") == 2
    logged += acknowledged(store, answers(12, 10))
    worker.work_once()  # within compact_interval_s: not again
    assert len(list_segments(tmp_path / "log" / "kt")) == 2
    assert full_log(store) == logged
    store.close()


# -- crash tests ----------------------------------------------------------------------------------------------------
# A real compaction process, SIGKILLed by itself when it reaches the phase (the second time, for the phases of each
# segment, so one segment is already done). "trim" arms a timer of 0-3 ms when the trim starts: the kill lands during
# or just after it (the trim is one atomic command / transaction, so both outcomes must hold up).
_COMPACT_AND_DIE = """
import os, random, signal, sys, threading, time
from pathlib import Path
from gramrec.trainer.retrain.log_compaction import compact_task
backend, where, log_dir, phase = sys.argv[1:5]
if backend == "redis":
    from gramrec.service.store.redis_store import RedisStore
    url, _, prefix = where.partition(" ")
    store = RedisStore.from_url(url, prefix)
else:
    from gramrec.service.store.sqlite_store import EmbeddedStore
    store = EmbeddedStore(Path(where))
seen = []
def on_phase(name):
    seen.append(name)
    if name != phase or (phase != "trim" and seen.count(name) < 2):
        return
    if phase == "trim":
        threading.Timer(random.uniform(0, 0.003), os.kill, (os.getpid(), signal.SIGKILL)).start()
        return
    os.kill(os.getpid(), signal.SIGKILL)
compact_task(store, Path(log_dir), "kt", int(sys.argv[5]), 0.0, on_phase)
time.sleep(5)
"""


@pytest.mark.parametrize("phase", PHASES)
def test_a_compaction_killed_at_each_phase_loses_and_duplicates_nothing(store_and_settings, tmp_path, phase):
    store, settings = store_and_settings
    where = f"{settings.redis_url} {settings.redis_key_prefix}" if settings.redis_url else str(settings.embedded_store_path)
    logged = acknowledged(store, answers(0, 25))
    log_dir = tmp_path / "log"
    run = subprocess.run(
        [sys.executable, "-c", _COMPACT_AND_DIE, "redis" if settings.redis_url else "embedded", where, str(log_dir), phase, str(SEGMENT)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    folder = log_dir / "kt"
    if phase == "written":
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")], "the kill did not land on a temp file"
    done = {"read": 1, "written": 1, "renamed": 2, "trim": 2}[phase]
    assert len(list_segments(folder)) == done
    assert full_log(store) == logged  # nothing lost, nothing twice, in order

    logged += acknowledged(store, answers(25, 7))  # the API keeps logging
    stats = compact_task(store, log_dir, "kt", SEGMENT, retention_s=0)  # the restart resumes where it stopped
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert stats.segments == 3 and stats.stream_length == 2
    assert full_log(store) == logged


def test_compacted_log_survives_a_redis_restart_with_aof(tmp_path):
    from gramrec.service.store.redis_store import RedisStore

    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        store = RedisStore.from_url(server.url, "aof:")
        logged = acknowledged(store, answers(0, 25))
        compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
        logged += acknowledged(store, answers(25, 3))
        store.close()
        server.kill()
        server.start()  # replays the AOF: the trim, the segment folder's name and the tail
        store = RedisStore.from_url(server.url, "aof:")
        assert store.count_interactions("kt") == 8
        assert full_log(store) == logged
        store.close()
    finally:
        server.close()


# -- a store lost or restored while its segments remain --------------------------------------------------------------
# sqlite numbers entries from a counter in its file: a new file restarts it at 1, an older backup rewinds it. Redis
# stamps stream ids with its clock: a flushed stream restarts at the clock, a restored older RDB rewinds the
# stream's last id. For Redis the entries before the loss are logged as by a server clock an hour ahead (explicit
# ids `<ms>-*`); after it the clock is right again, so new ids fall below the compacted ones.
AHEAD_MS = 3_600_000


def acknowledged_ahead(store, records) -> list[tuple[str, dict[str, str]]]:
    from gramrec.service.store.redis_store import RedisStore

    if not isinstance(store, RedisStore):
        return acknowledged(store, records)
    seconds, _ = store.client.time()
    ms = (int(seconds) + 3600) * 1000  # the same ms on every call: ids go on as <ms>-<seq + 1>
    pipe = store.client.pipeline(transaction=True)
    for record in records:
        pipe.xadd(store.key("interactions", "kt"), record, id=f"{ms}-*")
    return list(zip((i.decode() for i in pipe.execute()), records, strict=True))


def reopened(store, settings):
    if settings.redis_url:
        return store
    store.close()
    return open_store(settings)


def lose(store, settings):
    """The store's data is gone (a new sqlite file, the Redis keys flushed); the segment folder remains."""
    if settings.redis_url:
        drop_prefix(store.client, settings.redis_key_prefix)
        return store
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{settings.embedded_store_path}{suffix}").unlink(missing_ok=True)
    return open_store(settings)


def backup(store, settings, folder):
    if settings.redis_url:
        keys = list(store.client.scan_iter(match=settings.redis_key_prefix + "*"))
        return {key: store.client.dump(key) for key in keys}
    import sqlite3

    copy = sqlite3.connect(folder / "backup.sqlite3")
    store._db.backup(copy)
    copy.close()
    return folder / "backup.sqlite3"


def restore(store, settings, saved):
    """The store is replaced by an older backup of itself."""
    store = lose(store, settings)
    if settings.redis_url:
        for key, dumped in saved.items():
            store.client.restore(key, 0, dumped)
        return store
    store.close()
    shutil.copyfile(saved, settings.embedded_store_path)
    return open_store(settings)


def assert_log_holds(store, expected) -> None:
    """Every acknowledged entry once, in order of ids (the ids of entries moved past the compacted log changed)."""
    entries = full_log(store)
    assert [fields for _, fields in entries] == [fields for _, fields in expected]
    keys = [entry_key(i) for i, _ in entries]
    assert keys == sorted(set(keys))


def test_ids_issued_below_the_compacted_log_after_the_store_is_lost_are_kept(store_and_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(log_compaction, "REISSUE_PAGE", 5)  # the 12 entries move in 3 batches
    store, settings = store_and_settings
    logged = acknowledged_ahead(store, answers(0, 25))
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
    compacted_through = entry_key(list_segments(tmp_path / "log" / "kt")[-1].last)
    store = lose(store, settings)

    new = acknowledged(store, answers(100, 12))  # the API goes on logging into the new, empty store
    assert entry_key(new[0][0]) <= compacted_through  # the bug's premise: ids restarted below the compacted log
    stats = compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
    assert_log_holds(store, logged[:20] + new)  # the uncompacted tail (5) went with the store
    assert stats.renumbered == len([i for i, _ in new if entry_key(i) <= compacted_through])

    later = acknowledged(store, answers(200, 3))
    assert entry_key(later[0][0]) > max(entry_key(i) for i, _ in full_log(store)[:-3])
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)  # segments stay apart (list_segments checks)
    assert_log_holds(store, logged[:20] + new + later)


def test_a_store_restored_from_an_older_backup_reissues_no_compacted_id(store_and_settings, tmp_path):
    store, settings = store_and_settings
    logged = acknowledged_ahead(store, answers(0, 12))
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)  # one segment; 2 entries stay in the store
    saved = backup(store, settings, tmp_path)
    logged += acknowledged_ahead(store, answers(12, 13))
    compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)  # a second segment
    store = restore(store, settings, saved)

    new = acknowledged(store, answers(100, 6))  # the restored counter hands out ids the second segment holds
    with pytest.raises(SegmentError, match="not yet checked against the compacted log"):
        full_log(store)  # a reader refuses rather than skip them as compacted
    store.raise_id_floor("kt", list_segments(tmp_path / "log" / "kt")[-1].last)  # as a run killed in its guard
    with pytest.raises(SegmentError, match="not yet checked against the compacted log"):
        full_log(store)
    stats = compact_task(store, tmp_path / "log", "kt", SEGMENT, retention_s=0)
    assert stats.renumbered == 6  # the 2 restored entries the first segment holds were kept as they are
    assert_log_holds(store, logged[:20] + new)
    store = reopened(store, settings)
    assert_log_holds(store, logged[:20] + new)


def test_the_id_floor_never_goes_down(store_and_settings):
    store, _ = store_and_settings
    logged = acknowledged_ahead(store, answers(0, 3))
    store.trim_interactions("kt", logged[-1][0])  # an empty stream: Redis' XSETID would move its last id back
    store.raise_id_floor("kt", logged[0][0])
    assert entry_key(acknowledged(store, answers(3, 1))[0][0]) > entry_key(logged[-1][0])
    assert store.id_floor("kt") is None
    store.raise_id_floor("kt", logged[-1][0], checked=True)
    store.raise_id_floor("kt", logged[0][0], checked=True)  # the checked floor stays the highest one recorded
    assert store.id_floor("kt") == logged[-1][0]
