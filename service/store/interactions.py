"""The interaction log: answers (kt) and impressions (nr) logged by the API, read by retrains.

The store holds the log's live tail; the trainer compacts older entries into Parquet segment files and then
trims them from the store (trainer/retrain/log_compaction.py). The store records where those segments are, so
every reader of the log finds the compacted part too.
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


def next_stream_id(entry_id: str) -> str:
    """The smallest Redis stream id after `entry_id` ("ms-seq")."""
    ms, _, seq = entry_id.partition("-")
    return f"{int(ms)}-{int(seq or 0) + 1}"


class RedisInteractions:
    client: redis.Redis
    key: Callable[..., str]

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
