"""Compaction of the interaction log: the store's oldest entries -> Parquet segments -> trimmed from the store.

    POST /interactions ──XADD/INSERT──▶ store (live tail) ──compact──▶ <log dir>/<task>/<first>_<last>.parquet
                                          ▲ trimmed only after the segment is durable, and after `retention_s`

Order of a compaction run, and why no acknowledged entry is lost or duplicated when it is killed anywhere:
1. remove temp files a killed run left; resume after the last segment's last id (read from the file names);
   check the store's ids against it (guard_ids: a lost or restored store hands out compacted ids again);
2. read the next `segment_entries` entries after it (only full segments are written, so segments stay even);
3. record its last id as the store's checked id floor; write a temp file, fsync it, rename it to
   `<first>_<last>.parquet`, fsync the folder: the segment exists whole or not at all;
4. trim the store up to the last segment's last id (XTRIM MINID / one DELETE transaction), keeping entries
   logged within `retention_s`.
Readers (snapshot.logged_entries) take the segments, then the store's entries after the last segment's last id,
so an entry that is both in a segment and still in the store (killed between 3 and 4, or kept by retention) is
read once. Runs one at a time: under the retrain lease (trainer/retrain/worker.py).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from gramrec.service.settings import TASKS
from gramrec.service.store import Store
from gramrec.trainer.retrain.interaction_segments import (
    Segment,
    SegmentError,
    entry_key,
    list_segments,
    read_segment,
    remove_temp_files,
    write_segment,
)

log = logging.getLogger("gramrec.retrain")

READ_PAGE = 10_000  # entries per store round trip
REISSUE_PAGE = 1_000  # entries moved per script / transaction (a Redis script blocks the server while it runs)

# Phases a crash test can stop a run at: before a segment is written, after its bytes are written but before
# fsync and rename, after the rename but before the trim, and while the trim runs.
PHASES = ("read", "written", "renamed", "trim")


@dataclass
class LogStats:
    """The size of one task's log: what an operator (and the replay benchmark) watches to see it stay bounded."""

    task: str
    stream_length: int  # entries in the store's live tail
    segments: int
    segment_bytes: int
    last_compacted_id: str | None
    compacted: int = 0  # entries written to segments by this run
    trimmed: int = 0  # entries removed from the store by this run
    renumbered: int = 0  # entries this run moved past the compacted log (a lost or restored store issued their ids)


def task_folder(log_dir: Path, task: str) -> Path:
    return Path(log_dir) / task


def register_log_dir(store: Store, log_dir: Path) -> None:
    """Records the segment folder in the store, so every reader finds the compacted part of the log.

    Refuses a second folder: a log split over two folders would lose the part the readers do not look at.
    """
    wanted = str(Path(log_dir).resolve())
    current = store.log_segments_dir()
    if current is None:
        Path(wanted).mkdir(parents=True, exist_ok=True)  # readers refuse a named folder that is missing
        store.set_log_segments_dir(wanted)
    elif current != wanted:
        raise SegmentError(
            f"the interaction log's segments are in {current}, but this trainer writes to {wanted} "
            "(GRAMREC_RETRAIN__LOG_DIR): move the segments there, or point the setting at them"
        )


def compact_task(
    store: Store,
    log_dir: Path,
    task: str,
    segment_entries: int,
    retention_s: float,
    on_phase: Callable[[str], None] | None = None,
) -> LogStats:
    """One compaction run over one task's log (the module docstring gives its order and guarantees)."""
    phase = on_phase or (lambda _: None)
    register_log_dir(store, log_dir)
    folder = task_folder(log_dir, task)
    if removed := remove_temp_files(folder):
        log.info("removed half-written segments", extra={"task": task, "files": [p.name for p in removed]})
    segments = list_segments(folder)
    renumbered = guard_ids(store, task, segments)
    last = segments[-1].last if segments else None
    compacted = 0
    full = store.count_interactions(task) >= segment_entries  # else no full segment can be waiting: skip the read
    while full and len(entries := _read_after(store, task, last, segment_entries)) == segment_entries:
        phase("read")
        store.raise_id_floor(task, entries[-1][0], checked=True)  # before the segment exists: readers check it
        segment = write_segment(folder, entries, after_write=lambda: phase("written"))
        phase("renamed")
        last = segment.last
        compacted += len(entries)
    trimmed = 0
    if last is not None:
        phase("trim")
        trimmed = store.trim_interactions(task, last, older_than_s=retention_s)
    stats = log_stats(store, log_dir, task)
    stats.compacted, stats.trimmed, stats.renumbered = compacted, trimmed, renumbered
    return stats


def guard_ids(store: Store, task: str, segments: list[Segment]) -> int:
    """Makes the store issue ids after the last segment's only, and moves past it the entries it already issued at
    or below it; returns how many it moved.

    A store that lost its data (a new sqlite file, a flushed Redis) or was restored from an older backup hands out
    ids the segments already hold: readers would skip those entries as compacted and the trim would delete them.
    The store records the compacted id it was last checked against (`id_floor`, set before each segment is
    written), so an intact store costs one read. Otherwise the floor is raised first (no new id lands below it
    while this looks), and the store's entries up to the last segment's last id are compared with the segments:
    an entry a segment holds with the same id and fields is compacted; any other was reissued and is moved (in
    batches), and only then is the floor recorded as checked.
    """
    if not segments:
        return 0
    high = segments[-1].last
    checked = store.id_floor(task)
    if checked is not None and entry_key(checked) >= entry_key(high):
        return 0
    store.raise_id_floor(task, high)
    held = _read_through(store, task, checked, high)
    compacted = _compacted_fields(segments, {entry_id for entry_id, _ in held})
    reissued = [entry_id for entry_id, fields in held if compacted.get(entry_id) != fields]
    moved: list[str] = []
    for start in range(0, len(reissued), REISSUE_PAGE):  # killed in between: the next run moves the rest
        moved += store.reissue_interactions(task, reissued[start : start + REISSUE_PAGE])
    store.raise_id_floor(task, high, checked=True)
    if moved:
        log.warning(
            "interaction ids reissued at or below the compacted log (the store was lost or restored from an older "
            "backup); those entries were moved past it",
            extra={"task": task, "compacted_through": high, "moved": len(moved), "from": reissued[0], "to": moved[0]},
        )
    return len(moved)


def compact_log(
    store: Store, log_dir: Path, segment_entries: int, retention_s: float, tasks: tuple[str, ...] = TASKS
) -> list[LogStats]:
    """Compacts every task's log; logs (INFO) one line per task with its size, for operators."""
    started = time.perf_counter()
    stats = [compact_task(store, log_dir, task, segment_entries, retention_s) for task in tasks]
    for entry in stats:
        log.info(
            "interaction log compacted", extra=asdict(entry) | {"seconds": round(time.perf_counter() - started, 3)}
        )
    return stats


def log_stats(store: Store, log_dir: Path, task: str) -> LogStats:
    segments = list_segments(task_folder(log_dir, task))
    return LogStats(
        task=task,
        stream_length=store.count_interactions(task),
        segments=len(segments),
        segment_bytes=sum(s.bytes for s in segments),
        last_compacted_id=segments[-1].last if segments else None,
    )


def _read_through(store: Store, task: str, after: str | None, through: str) -> list[tuple[str, dict[str, str]]]:
    """The store's entries after id `after` (all when None) up to id `through`, oldest first."""
    entries: list[tuple[str, dict[str, str]]] = []
    while page := store.read_interactions(task, count=READ_PAGE, after=after):
        entries += [entry for entry in page if entry_key(entry[0]) <= entry_key(through)]
        if entry_key(page[-1][0]) >= entry_key(through):
            break
        after = page[-1][0]
    return entries


def _compacted_fields(segments: list[Segment], ids: Collection[str]) -> dict[str, dict[str, str]]:
    """Id -> fields of the entries among `ids` that the segments hold (only segments whose range has one are read)."""
    keys = sorted(entry_key(entry_id) for entry_id in ids)
    found: dict[str, dict[str, str]] = {}
    for segment in segments:
        i = bisect_left(keys, entry_key(segment.first))
        if i < len(keys) and keys[i] <= entry_key(segment.last):
            found |= {entry_id: fields for entry_id, fields in read_segment(segment) if entry_id in ids}
    return found


def _read_after(store: Store, task: str, after: str | None, count: int) -> list[tuple[str, dict[str, str]]]:
    """Up to `count` store entries after id `after`, oldest first."""
    entries: list[tuple[str, dict[str, str]]] = []
    while len(entries) < count:
        page = store.read_interactions(task, count=min(READ_PAGE, count - len(entries)), after=after)
        if not page:
            break
        entries += page
        after = page[-1][0]
    return entries
