"""The interaction log: answers (kt) and impressions (nr) logged by the API, read by retrains.

The store holds the log's live tail; the trainer compacts older entries into Parquet segment files and then
trims them from the store (trainer/retrain/log_compaction.py). The store records where those segments are, so
every reader of the log finds the compacted part too.

Ids only grow, also across a loss of the store: a store that lost its data (a new sqlite file, a flushed or evicted
Redis stream) or was restored from an older backup would hand out ids again at or below the compacted ones (sqlite
restarts its counter; Redis stamps ids with its clock, which may be behind the compacted ids, and a restored stream
goes on from its old last id). Compaction raises the store's id floor past the segments and records, in the same
file or stream, the compacted id it checked the store against (`id_floor`); readers refuse a store not checked.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis


class InteractionLog(Protocol):
    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]: ...
    def read_interactions(
        self, task: str, count: int = 100, after: str | None = None
    ) -> list[tuple[str, dict[str, str]]]: ...
    def trim_interactions(self, task: str, up_to_id: str, older_than_s: float = 0.0) -> int: ...
    def count_interactions(self, task: str) -> int: ...
    def log_segments_dir(self) -> str | None: ...
    def set_log_segments_dir(self, directory: str) -> None: ...
    def id_floor(self, task: str) -> str | None: ...
    def raise_id_floor(self, task: str, floor: str, checked: bool = False) -> None: ...
    def reissue_interactions(self, task: str, entry_ids: Sequence[str]) -> list[str]: ...


def next_stream_id(entry_id: str) -> str:
    """The smallest Redis stream id after `entry_id` ("ms-seq")."""
    ms, _, seq = entry_id.partition("-")
    return f"{int(ms)}-{int(seq or 0) + 1}"


# Stream ids compared in Lua ("ms-seq"; ms fits a double exactly), and the stream's last id raised to a floor: an
# absent stream is created empty with that last id (XADD MAXLEN 0); an existing one is only moved up (XSETID would
# also move the last id of an empty stream down).
_FLOOR = """
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
local function raise(stream, floor)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XADD', stream, 'MAXLEN', '0', floor, 'floor', '')
  elseif before(field(redis.call('XINFO', 'STREAM', stream), 'last-generated-id'), floor) then
    redis.call('XSETID', stream, floor)
  end
end
"""
# KEYS[1] stream; ARGV[1] floor, ARGV[2] "1" to record it as checked: the last delivered id of the stream's
# consumer group `compacted` (nothing reads through it), so the record lives and dies with the stream.
_RAISE_FLOOR = (
    _FLOOR
    + """
raise(KEYS[1], ARGV[1])
if ARGV[2] ~= '1' then return end
local checked
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == 'compacted' then checked = field(group, 'last-delivered-id') end
end
if not checked then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'compacted', ARGV[1])
elseif before(checked, ARGV[1]) then
  redis.call('XGROUP', 'SETID', KEYS[1], 'compacted', ARGV[1])
end
"""
)
# KEYS[1] stream; ARGV: ids of entries to move to new ids at the stream's end (same fields, same order)
_REISSUE = """
local moved = {}
for i = 1, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
  if entry then
    moved[#moved + 1] = redis.call('XADD', KEYS[1], '*', unpack(entry[2]))
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return moved
"""
FLOOR_GROUP = "compacted"


class RedisInteractions:
    client: redis.Redis
    key: Callable[..., str]
    _raise_floor: Any
    _reissue: Any

    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]:
        pipe = self.client.pipeline(transaction=True)
        for record in records:
            pipe.xadd(self.key("interactions", task), record)  # type: ignore[arg-type]
        return [stream_id.decode() for stream_id in pipe.execute()]

    def read_interactions(
        self, task: str, count: int = 100, after: str | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` logged entries, oldest first, after stream id `after` (exclusive) if given."""
        start = f"({after}" if after else "-"
        entries = self.client.xrange(self.key("interactions", task), min=start, count=count)
        return [(i.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for i, fields in entries]  # type: ignore[union-attr]

    def trim_interactions(self, task: str, up_to_id: str, older_than_s: float = 0.0) -> int:
        """Removes the entries with ids <= up_to_id that were logged more than `older_than_s` ago (by the Redis
        server's clock, which stamps stream ids); one exact XTRIM MINID. Returns how many were removed."""
        threshold = next_stream_id(up_to_id)
        if older_than_s > 0:
            seconds, micros = self.client.time()
            cutoff_ms = int(seconds) * 1000 + int(micros) // 1000 - int(older_than_s * 1000)
            threshold = min(threshold, f"{cutoff_ms}-0", key=lambda i: tuple(int(p) for p in i.split("-")))
        return int(self.client.xtrim(self.key("interactions", task), minid=threshold, approximate=False))

    def count_interactions(self, task: str) -> int:
        return int(self.client.xlen(self.key("interactions", task)))

    def log_segments_dir(self) -> str | None:
        value = self.client.get(self.key("log-segments"))
        return value.decode() if value is not None else None  # type: ignore[union-attr]

    def set_log_segments_dir(self, directory: str) -> None:
        self.client.set(self.key("log-segments"), directory)

    def id_floor(self, task: str) -> str | None:
        """The compacted id this stream was last checked against (None: never, e.g. a new or flushed stream)."""
        stream = self.key("interactions", task)
        if not self.client.exists(stream):
            return None
        groups = self.client.xinfo_groups(stream)
        return next((g["last-delivered-id"].decode() for g in groups if g["name"].decode() == FLOOR_GROUP), None)

    def raise_id_floor(self, task: str, floor: str, checked: bool = False) -> None:
        """Every id XADD issues from now on is after `floor` (the stream's last id is moved up, never down);
        `checked`: also records `floor` as checked (id_floor; never moved down either). One script."""
        self._raise_floor(keys=[self.key("interactions", task)], args=[floor, "1" if checked else "0"])

    def reissue_interactions(self, task: str, entry_ids: Sequence[str]) -> list[str]:
        """Moves the entries to new ids at the stream's end (same fields, same order), in one script; returns the
        new ids. Keep the batches small: the script blocks Redis while it runs."""
        moved = self._reissue(keys=[self.key("interactions", task)], args=list(entry_ids))
        return [entry_id.decode() for entry_id in moved]


class SqliteInteractions:
    _lock: threading.RLock
    _db: sqlite3.Connection
    _query: Callable[..., list[tuple]]
    _transaction: Callable[..., Any]

    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]:
        def log(cursor: sqlite3.Cursor) -> list[str]:
            now = time.time()
            ids = []
            for record in records:
                cursor.execute(
                    "INSERT INTO interactions (task, logged_at, fields) VALUES (?, ?, ?)",
                    (task, now, json.dumps(record)),
                )
                ids.append(str(cursor.lastrowid))
            return ids

        return self._transaction(log)

    def read_interactions(
        self, task: str, count: int = 100, after: str | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        rows = self._query(
            "SELECT id, fields FROM interactions WHERE task = ? AND id > ? ORDER BY id LIMIT ?",
            (task, int(after or 0), count),
        )
        return [(str(i), json.loads(fields)) for i, fields in rows]

    def trim_interactions(self, task: str, up_to_id: str, older_than_s: float = 0.0) -> int:
        """Deletes rows with ids <= up_to_id logged more than `older_than_s` ago, in one transaction."""
        cutoff = time.time() - older_than_s
        return self._transaction(
            lambda cursor: (
                cursor.execute(
                    "DELETE FROM interactions WHERE task = ? AND id <= ? AND logged_at <= ?",
                    (task, int(up_to_id), cutoff),
                ).rowcount
            )
        )

    def count_interactions(self, task: str) -> int:
        return self._query("SELECT COUNT(*) FROM interactions WHERE task = ?", (task,))[0][0]

    def log_segments_dir(self) -> str | None:
        rows = self._query("SELECT value FROM flags WHERE name = 'log-segments'")
        return rows[0][0] if rows else None

    def set_log_segments_dir(self, directory: str) -> None:
        self._transaction(
            lambda cursor: cursor.execute(
                "INSERT OR REPLACE INTO flags (name, value, expires_at) VALUES ('log-segments', ?, NULL)", (directory,)
            )
        )

    def id_floor(self, task: str) -> str | None:
        """The compacted id this file was last checked against (None: never, e.g. a new file)."""
        rows = self._query("SELECT value FROM flags WHERE name = ?", (f"id-floor:{task}",))
        return rows[0][0] if rows else None

    def raise_id_floor(self, task: str, floor: str, checked: bool = False) -> None:
        """Every id issued from now on is after `floor` (one counter for all tasks: AUTOINCREMENT's, moved up,
        never down); `checked`: also records `floor` as checked (id_floor; never moved down). One transaction."""

        def raise_floor(cursor: sqlite3.Cursor) -> None:
            cursor.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'interactions'", (int(floor),))
            if cursor.rowcount == 0:  # sqlite_sequence is an ordinary table; the next id is above it and every id
                cursor.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('interactions', ?)", (int(floor),))
            if checked:
                cursor.execute(
                    "INSERT INTO flags (name, value, expires_at) VALUES (?, ?, NULL) ON CONFLICT (name) DO UPDATE"
                    " SET value = excluded.value WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                    (f"id-floor:{task}", floor),
                )

        self._transaction(raise_floor)

    def reissue_interactions(self, task: str, entry_ids: Sequence[str]) -> list[str]:
        """Moves the entries to new ids at the log's end (same fields, same logged_at, same order), in one
        transaction; returns the new ids."""

        def reissue(cursor: sqlite3.Cursor) -> list[str]:
            moved = []
            for entry_id in entry_ids:
                row = cursor.execute(
                    "SELECT logged_at, fields FROM interactions WHERE task = ? AND id = ?", (task, int(entry_id))
                ).fetchone()
                if row is not None:
                    cursor.execute("DELETE FROM interactions WHERE id = ?", (int(entry_id),))
                    cursor.execute("INSERT INTO interactions (task, logged_at, fields) VALUES (?, ?, ?)", (task, *row))
                    moved.append(str(cursor.lastrowid))
            return moved

        return self._transaction(reissue)
