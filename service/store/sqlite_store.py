"""The store without Redis: the same interface in-process, persisted in one sqlite file (stdlib, WAL mode).

For a single host (workers of one machine share the file). Every write is one transaction, so a batch is stored
whole or not at all, and a table becomes visible (a row in `tables`) in the same commit as its vectors.
It has no pub/sub: API workers follow activations by polling the pointer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from gramrec.service.store.beacons import SqliteBeacons
from gramrec.service.store.errors import StoreError
from gramrec.service.store.interactions import SqliteInteractions
from gramrec.service.store.items import SqliteItems
from gramrec.service.store.jobs import SqliteJobs
from gramrec.service.store.leases import SqliteLeases

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (version TEXT PRIMARY KEY, loaded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    version TEXT NOT NULL, item_id TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (version, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vector_texts (
    version TEXT NOT NULL, item_id TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (version, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active (task TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS texts (
    task TEXT NOT NULL, item_id TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (task, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_meta (
    task TEXT NOT NULL, item_id TEXT NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (task, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, item_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS item_changes_item ON item_changes (task, item_id);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, logged_at REAL NOT NULL, fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retrain_queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retrain_pending (task TEXT PRIMARY KEY, job_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS flags (name TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL);
"""


class EmbeddedStore(SqliteItems, SqliteInteractions, SqliteJobs, SqliteLeases, SqliteBeacons):
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
