"""The store without Redis: the same interface in-process, persisted in one sqlite file (stdlib, WAL mode).

For a single host (workers of one machine share the file). Every write is one transaction, so a batch is stored
whole or not at all, and a table becomes visible (a row in `tables`) in the same commit as its vectors.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.item_store import StaleVersion, StoreError, same_length, vector_rows

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

    def compare_and_set_active(self, task: str, expected: str | None, new: str) -> bool:
        def cas(cursor: sqlite3.Cursor) -> bool:
            row = cursor.execute("SELECT version FROM active WHERE task = ?", (task,)).fetchone()
            if (row[0] if row else None) != expected:
                return False
            cursor.execute("INSERT OR REPLACE INTO active (task, version) VALUES (?, ?)", (task, new))
            return True

        return self._transaction(cas)

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

    def read_interactions(self, task: str, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        rows = self._query("SELECT id, fields FROM interactions WHERE task = ? ORDER BY id LIMIT ?", (task, count))
        return [(str(i), json.loads(fields)) for i, fields in rows]

    def enqueue_job(self, job: dict) -> None:
        def enqueue(cursor: sqlite3.Cursor) -> None:
            cursor.execute("INSERT INTO jobs (id, record) VALUES (?, ?)", (job["id"], json.dumps(job)))
            cursor.execute("INSERT INTO retrain_queue (job_id) VALUES (?)", (job["id"],))

        self._transaction(enqueue)

    def get_job(self, job_id: str) -> dict | None:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows else None
