"""Immutable Parquet segments of the interaction log: one file per contiguous range of entry ids.

A segment is named after the first and last entry id it holds (`<first>_<last>.parquet`), so the log's state is
read from the folder alone: the last segment's last id is where compaction resumes and where a reader switches to
the store's live tail. A segment is written to a hidden temp name, fsynced, renamed, and the folder fsynced, so
a segment file either is complete or does not exist; a temp file left by a crash is ignored and removed.

Entry ids compare as the store issues them: Redis stream ids `ms-seq`, sqlite integers (`entry_key`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIX = ".parquet"
TEMP_PREFIX = "."
SCHEMA = pa.schema([("id", pa.string()), ("fields", pa.map_(pa.string(), pa.string()))])


class SegmentError(ValueError):
    """A segment folder that does not hold a well-formed, non-overlapping sequence of segments."""


def entry_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a log entry id: Redis `ms-seq` -> (ms, seq); sqlite `n` -> (n, 0)."""
    first, _, second = entry_id.partition("-")
    try:
        return int(first), int(second or 0)
    except ValueError:
        raise SegmentError(f"not a log entry id: {entry_id!r}") from None


@dataclass(frozen=True)
class Segment:
    path: Path
    first: str
    last: str

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def segment_name(first: str, last: str) -> str:
    return f"{first}_{last}{SUFFIX}"


def list_segments(folder: Path) -> list[Segment]:
    """The folder's segments in id order; raises SegmentError on a foreign file name or overlapping ranges."""
    if not folder.is_dir():
        return []
    segments = []
    for path in folder.iterdir():
        if path.name.startswith(TEMP_PREFIX) or path.suffix != SUFFIX:
            continue
        first, sep, last = path.stem.partition("_")
        if not sep or entry_key(first) > entry_key(last):
            raise SegmentError(f"{path}: not a segment name (<first id>_<last id>{SUFFIX})")
        segments.append(Segment(path, first, last))
    segments.sort(key=lambda s: entry_key(s.first))
    for before, after in zip(segments, segments[1:], strict=False):
        if entry_key(after.first) <= entry_key(before.last):
            raise SegmentError(f"{after.path} overlaps {before.path}")
    return segments


def remove_temp_files(folder: Path) -> list[Path]:
    """Deletes half-written segments a killed compaction left behind; returns them."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_segment(folder: Path, entries: Sequence[tuple[str, dict[str, str]]], after_write=None) -> Segment:
    """Writes entries (oldest first) as one segment: temp file, fsync, rename, fsync of the folder.

    after_write: called between writing the temp file and making it durable (crash tests kill the process there).
    """
    if not entries:
        raise ValueError("a segment holds at least one entry")
    folder.mkdir(parents=True, exist_ok=True)
    first, last = entries[0][0], entries[-1][0]
    final = folder / segment_name(first, last)
    temp = folder / f"{TEMP_PREFIX}{final.name}.tmp"
    table = pa.table(
        {"id": [entry_id for entry_id, _ in entries], "fields": [list(fields.items()) for _, fields in entries]},
        schema=SCHEMA,
    )
    with open(temp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        if after_write is not None:
            after_write()
        os.fsync(f.fileno())
    os.replace(temp, final)
    fsync_dir(folder)
    return Segment(final, first, last)


def read_segment(segment: Segment) -> Iterator[tuple[str, dict[str, str]]]:
    """The segment's entries, oldest first."""
    table = pq.read_table(segment.path, schema=SCHEMA)
    for batch in table.to_batches():
        columns = batch.to_pydict()
        for entry_id, fields in zip(columns["id"], columns["fields"], strict=True):
            yield entry_id, dict(fields)


def fsync_dir(folder: Path) -> None:
    """Makes a rename in the folder durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
