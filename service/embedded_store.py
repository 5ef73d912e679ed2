"""The store without Redis: the same interface in-process, persisted in one sqlite file (stdlib, WAL mode).

For a single host (workers of one machine share the file). Every write is one transaction, so a batch is stored
whole or not at all, and a table becomes visible (a row in `tables`) in the same commit as its vectors.
It has no pub/sub: API workers follow activations by polling the pointer.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gramrec.service.item_store import (
    MAX_JOB_RECORDS,
    LeaseLost,
    StaleVersion,
    StoreError,
    newest_first,
    prunable_jobs,
    same_length,
    vector_rows,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (version TEXT PRIMARY KEY, loaded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    version TEXT NOT NULL, item_id TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (version, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active (task TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS texts (
    task TEXT NOT NULL, item_id TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (task, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, logged_at REAL NOT NULL, fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retrain_queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retrain_pending (task TEXT PRIMARY KEY, job_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS flags (name TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL);
"""

_MAX_PARAMS = 900  # stays under every sqlite build's bound-parameter limit


class EmbeddedStore:
    """Thread-safe: one connection, one lock (each call is short; sqlite serialises writers anyway)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the embedded store: {exc}") from exc

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _transaction(self, work) -> object:
        """Runs work(cursor) in one IMMEDIATE transaction: all of it is stored, or none."""
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                result = work(cursor)
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            return result

    def ping(self) -> bool:
        try:
            return self._query("SELECT 1") == [(1,)]
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- active pointers ------------------------------------------------------------------------------------------
    def active_version(self, task: str) -> str | None:
        rows = self._query("SELECT version FROM active WHERE task = ?", (task,))
        return rows[0][0] if rows else None

    def compare_and_set_active(self, task: str, expected: str | None, new: str, lease=None) -> bool:
        def cas(cursor: sqlite3.Cursor) -> bool:
            if lease is not None and not _holds(cursor, lease.key, lease.token):
                raise LeaseLost(f"lease {lease.key} is no longer held by this process")
            row = cursor.execute("SELECT version FROM active WHERE task = ?", (task,)).fetchone()
            if (row[0] if row else None) != expected:
                return False
            cursor.execute("INSERT OR REPLACE INTO active (task, version) VALUES (?, ?)", (task, new))
            return True

        return self._transaction(cas)

    def publish_activation(self, task: str, version: str) -> None:
        """No pub/sub here: other workers see the new pointer at their next poll."""

    def listen_activations(self, on_activation: Callable[[str, str], None], stop: threading.Event) -> None:
        stop.wait()

    # -- tables ---------------------------------------------------------------------------------------------------
    def has_table(self, version: str) -> bool:
        return bool(self._query("SELECT 1 FROM tables WHERE version = ?", (version,)))

    def load_table(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> bool:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows)

        def load(cursor: sqlite3.Cursor) -> bool:
            if cursor.execute("SELECT 1 FROM tables WHERE version = ?", (version,)).fetchone():
                return False
            cursor.executemany(
                "INSERT OR REPLACE INTO vectors (version, item_id, vector) VALUES (?, ?, ?)",
                ((version, item_id, row) for item_id, row in zip(ids, rows, strict=True)),
            )
            cursor.execute("INSERT INTO tables (version, loaded_at) VALUES (?, ?)", (version, time.time()))
            return True

        return self._transaction(load)

    def table_ids(self, version: str) -> set[str]:
        return {row[0] for row in self._query("SELECT item_id FROM vectors WHERE version = ?", (version,))}

    def drop_table(self, version: str) -> None:
        def drop(cursor: sqlite3.Cursor) -> None:
            cursor.execute("DELETE FROM vectors WHERE version = ?", (version,))
            cursor.execute("DELETE FROM tables WHERE version = ?", (version,))

        self._transaction(drop)

    def count_items(self, version: str) -> int:
        return self._query("SELECT COUNT(*) FROM vectors WHERE version = ?", (version,))[0][0]

    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(ids))
        with self._lock:
            for start in range(0, len(unique), _MAX_PARAMS):
                chunk = unique[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT item_id, vector FROM vectors WHERE version = ? AND item_id IN ({marks})"
                found.update(self._db.execute(sql, (version, *chunk)).fetchall())
        return [found.get(item_id) for item_id in ids]

    def add_vectors(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows)
        self._transaction(
            lambda cursor: cursor.executemany(
                "INSERT OR REPLACE INTO vectors (version, item_id, vector) VALUES (?, ?, ?)",
                ((version, item_id, row) for item_id, row in zip(ids, rows, strict=True)),
            )
        )

    # -- items added through the API --------------------------------------------------------------------------------
    def texts(self, task: str) -> dict[str, str]:
        return dict(self._query("SELECT item_id, text FROM texts WHERE task = ?", (task,)))

    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]:
        with self._lock:
            text = self._db.execute("SELECT text FROM texts WHERE task = ? AND item_id = ?", (task, item_id)).fetchone()
            vector = self._db.execute(
                "SELECT vector FROM vectors WHERE version = ? AND item_id = ?", (version, item_id)
            ).fetchone()
        return (text[0] if text else None), (vector[0] if vector else None)

    def put_items(
        self, task: str, version: str, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, dim: int
    ) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, texts)

        def put(cursor: sqlite3.Cursor) -> None:
            row = cursor.execute("SELECT version FROM active WHERE task = ?", (task,)).fetchone()
            if not row or row[0] != version:
                raise StaleVersion(f"{version} is no longer the active {task} version")
            cursor.executemany(
                "INSERT OR REPLACE INTO vectors (version, item_id, vector) VALUES (?, ?, ?)",
                ((version, item_id, vector) for item_id, vector in zip(ids, rows, strict=True)),
            )
            cursor.executemany(
                "INSERT OR REPLACE INTO texts (task, item_id, text) VALUES (?, ?, ?)",
                ((task, item_id, text) for item_id, text in zip(ids, texts, strict=True)),
            )

        self._transaction(put)

    # -- interactions and jobs ----------------------------------------------------------------------------------------
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

    def enqueue_job(self, job: dict) -> dict:
        def enqueue(cursor: sqlite3.Cursor) -> dict:
            waiting = cursor.execute(
                "SELECT jobs.record FROM retrain_pending JOIN jobs ON jobs.id = retrain_pending.job_id "
                "WHERE retrain_pending.task = ?",
                (job["task"],),
            ).fetchone()
            if waiting:
                return json.loads(waiting[0])
            cursor.execute("INSERT INTO jobs (id, record) VALUES (?, ?)", (job["id"], json.dumps(job)))
            cursor.execute("INSERT INTO retrain_queue (job_id) VALUES (?)", (job["id"],))
            cursor.execute("INSERT OR REPLACE INTO retrain_pending (task, job_id) VALUES (?, ?)", (job["task"], job["id"]))
            return job

        return self._transaction(enqueue)

    def get_job(self, job_id: str) -> dict | None:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows else None

    def update_job(self, job: dict) -> None:
        self._query("INSERT OR REPLACE INTO jobs (id, record) VALUES (?, ?)", (job["id"], json.dumps(job)))

    def list_jobs(self, limit: int = 50) -> list[dict]:
        return newest_first([record for (record,) in self._query("SELECT record FROM jobs")])[:limit]

    def prune_jobs(self, keep: int = MAX_JOB_RECORDS) -> None:
        finished = prunable_jobs(self.list_jobs(limit=1 << 30), keep)
        self._transaction(lambda cursor: cursor.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in finished]))

    def next_job(self) -> dict | None:
        def pop(cursor: sqlite3.Cursor) -> dict | None:
            row = cursor.execute("SELECT seq, job_id FROM retrain_queue ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            cursor.execute("DELETE FROM retrain_queue WHERE seq = ?", (row[0],))
            record = cursor.execute("SELECT record FROM jobs WHERE id = ?", (row[1],)).fetchone()
            if record is None:
                return None
            job = json.loads(record[0])
            cursor.execute("DELETE FROM retrain_pending WHERE task = ? AND job_id = ?", (job["task"], job["id"]))
            cursor.execute(
                "INSERT OR REPLACE INTO flags (name, value, expires_at) VALUES ('retrain-current', ?, NULL)", (job["id"],)
            )
            return job

        return self._transaction(pop)

    def current_job(self) -> str | None:
        rows = self._query("SELECT value FROM flags WHERE name = 'retrain-current'")
        return rows[0][0] if rows else None

    def finish_current_job(self, job_id: str) -> None:
        self._query("DELETE FROM flags WHERE name = 'retrain-current' AND value = ?", (job_id,))

    def lease(self, name: str, ttl_s: float) -> EmbeddedLease:
        return EmbeddedLease(self, f"lock:{name}", ttl_s)

    def claim_tick(self, task: str, tick: str, ttl_s: float) -> bool:
        def claim(cursor: sqlite3.Cursor) -> bool:
            now = time.time()
            cursor.execute("DELETE FROM flags WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))
            name = f"tick:{task}:{tick}"
            if cursor.execute("SELECT 1 FROM flags WHERE name = ?", (name,)).fetchone():
                return False
            cursor.execute("INSERT INTO flags (name, value, expires_at) VALUES (?, '1', ?)", (name, now + ttl_s))
            return True

        return self._transaction(claim)


def _holds(cursor: sqlite3.Cursor, key: str, token: str) -> bool:
    row = cursor.execute("SELECT token, expires_at FROM leases WHERE name = ?", (key,)).fetchone()
    return row is not None and row[0] == token and row[1] > time.time()


class EmbeddedLease:
    """The lease in a sqlite row (name, token, expiry); every change is one IMMEDIATE transaction."""

    def __init__(self, store: EmbeddedStore, key: str, ttl_s: float):
        self.key = key
        self.token = secrets.token_hex(16)
        self._store = store
        self._ttl_s = ttl_s

    def acquire(self) -> bool:
        def take(cursor: sqlite3.Cursor) -> bool:
            row = cursor.execute("SELECT expires_at FROM leases WHERE name = ?", (self.key,)).fetchone()
            if row is not None and row[0] > time.time():
                return False
            cursor.execute(
                "INSERT OR REPLACE INTO leases (name, token, expires_at) VALUES (?, ?, ?)",
                (self.key, self.token, time.time() + self._ttl_s),
            )
            return True

        return self._store._transaction(take)

    def renew(self) -> bool:
        def extend(cursor: sqlite3.Cursor) -> bool:
            if not _holds(cursor, self.key, self.token):
                return False
            cursor.execute("UPDATE leases SET expires_at = ? WHERE name = ?", (time.time() + self._ttl_s, self.key))
            return True

        return self._store._transaction(extend)

    def release(self) -> None:
        self._store._transaction(
            lambda cursor: cursor.execute("DELETE FROM leases WHERE name = ? AND token = ?", (self.key, self.token))
        )
