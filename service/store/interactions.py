"""The interaction log: answers (kt) and impressions (nr) logged by the API, read by retrains."""

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
