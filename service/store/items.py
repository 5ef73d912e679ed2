"""The item store: active pointers, versioned item tables (float32 rows), texts of API-added items."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import redis

from gramrec.service.store.errors import LeaseLost, StaleVersion, StoreError
from gramrec.service.store.leases import Lease, _holds

LOAD_CHUNK = 1000  # items per HSET while bulk-loading a table
_CHUNKS_PER_ROUND_TRIP = 8
_MAX_PARAMS = 900  # stays under every sqlite build's bound-parameter limit


def vector_rows(vectors: np.ndarray, dim: int) -> list[bytes]:
    """Validates a [n, dim] batch (finite, right shape) and returns one little-endian float32 row each.

    Called before any write, so a bad batch is refused whole and nothing of it is stored.
    """
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"vectors must have shape [n, {dim}], got {list(array.shape)}")
    array = np.ascontiguousarray(array, dtype="<f4")
    if not np.isfinite(array).all():
        raise ValueError("vectors must be finite (found NaN or inf)")
    return [row.tobytes() for row in array]


def text_digest(text: str) -> str:
    """What a row's vector was encoded from, kept beside it: an activation compares it with the item's current
    text and re-encodes only rows whose text has changed since (a rollback to an older version included)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def same_length(ids: Sequence[str], *columns: Sequence) -> None:
    if any(len(column) != len(ids) for column in columns):
        raise ValueError(f"{len(ids)} item ids, but columns of lengths {[len(c) for c in columns]}")


def decode_rows(rows: Sequence[bytes | None], dim: int) -> tuple[np.ndarray, list[int]]:
    """Raw rows as read from the store -> ([n, dim] float32 matrix with zero rows for absent items, absent indices)."""
    missing = [i for i, row in enumerate(rows) if row is None]
    width = 4 * dim
    if missing:
        rows = [b"\0" * width if row is None else row for row in rows]
    if any(len(row) != width for row in rows):  # type: ignore[arg-type]
        raise StoreError(f"item table holds vectors of the wrong size (expected {dim} float32)")
    matrix = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim)  # type: ignore[arg-type]
    return matrix, missing


class ItemStore(Protocol):
    def active_version(self, task: str) -> str | None: ...
    def compare_and_set_active(self, task: str, expected: str | None, new: str, lease: Lease | None = None) -> bool: ...
    def publish_activation(self, task: str, version: str) -> None: ...
    def listen_activations(self, on_activation: Callable[[str, str], None], stop: threading.Event) -> None: ...
    def has_table(self, version: str) -> bool: ...
    def load_table(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> bool: ...
    def table_ids(self, version: str) -> set[str]: ...
    def drop_table(self, version: str) -> None: ...
    def count_items(self, version: str) -> int: ...
    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]: ...
    def add_vectors(
        self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int, texts: Sequence[str] | None = None
    ) -> None: ...
    def text_digests(self, version: str, ids: Sequence[str]) -> dict[str, str]: ...
    def texts(self, task: str) -> dict[str, str]: ...
    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]: ...
    def put_items(
        self,
        task: str,
        version: str,
        ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        dim: int,
        metadata: Sequence[dict] | None = None,
    ) -> None: ...
    def item_metadata(self, task: str, ids: Sequence[str] | None = None) -> dict[str, dict]: ...
    def item_changes(self, task: str, after: int) -> tuple[int, list[str]]: ...


def metadata_rows(ids: Sequence[str], metadata: Sequence[dict] | None) -> list[str]:
    """One JSON object per item (`{}`: none); an item's metadata is replaced whole by each POST /items."""
    if metadata is None:
        return ["{}"] * len(ids)
    same_length(ids, metadata)
    return [json.dumps(m, separators=(",", ":"), sort_keys=True) for m in metadata]


def _decode_metadata(raw: str | bytes | None) -> dict:
    if raw is None:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


# KEYS: active pointer[, lease]. ARGV: expected ('' for none), new[, lease token].
_CAS = """
if KEYS[2] ~= nil and redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: active pointer, table, texts, metadata, change log (sorted set), change counter, table's text digests.
# ARGV: version, then (id, vector, text, metadata JSON, text digest) quintuples. Each item's change-log score is a new sequence
# number, so a process's catalog index reads everything changed after the last number it saw.
_PUT_ITEMS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 5 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 3])
  redis.call('HSET', KEYS[7], ARGV[i], ARGV[i + 4])
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), ARGV[i])
end
return 1
"""


class RedisItems:
    client: redis.Redis
    key: Callable[..., str]
    _cas: Any
    _put_items: Any

    def active_version(self, task: str) -> str | None:
        value = self.client.get(self.key("active", task))
        return value.decode() if value is not None else None  # type: ignore[union-attr]

    def compare_and_set_active(self, task: str, expected: str | None, new: str, lease: Lease | None = None) -> bool:
        """Sets the pointer if it still names `expected`; with a lease, only while the caller still holds it.

        Raises LeaseLost when the lease has expired or passed to another holder.
        """
        keys, args = [self.key("active", task)], [expected or "", new]
        if lease is not None:
            keys.append(lease.key)
            args.append(lease.token)
        result = int(self._cas(keys=keys, args=args))
        if result < 0:
            raise LeaseLost(f"lease {lease.key} is no longer held by this process")  # type: ignore[union-attr]
        return bool(result)

    def publish_activation(self, task: str, version: str) -> None:
        self.client.publish(self.key("events"), f"{task} {version}")

    def listen_activations(self, on_activation: Callable[[str, str], None], stop: threading.Event) -> None:
        """Calls on_activation(task, version) for each activation published, until `stop` is set.

        Returns on a connection error too (the caller re-subscribes after a pause; polling covers the gap).
        """
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.key("events"))
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    task, _, version = message["data"].decode().partition(" ")
                    on_activation(task, version)
        finally:
            pubsub.close()

    def has_table(self, version: str) -> bool:
        return bool(self.client.exists(self.key("table", version)))

    def load_table(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> bool:
        """Bulk-loads a version's table unless it exists; returns whether this call loaded it."""
        if self.has_table(version):
            return False
        rows = vector_rows(vectors, dim)
        same_length(ids, rows)
        ids = list(ids)
        staging = self.key("staging", version, secrets.token_hex(8))
        try:
            pipe = self.client.pipeline(transaction=False)
            for n, start in enumerate(range(0, len(ids), LOAD_CHUNK), start=1):
                chunk = slice(start, start + LOAD_CHUNK)
                pipe.hset(staging, mapping=dict(zip(ids[chunk], rows[chunk], strict=True)))
                if n % _CHUNKS_PER_ROUND_TRIP == 0:
                    pipe.execute()
            pipe.execute()
            if not len(ids):
                return False  # Redis has no empty hashes; an empty table needs no key
            # Digests left from an evicted table would vouch for rows this load replaces with catalog vectors;
            # without them, activation compares each row with its catalog text instead.
            self.client.unlink(self.key("table-texts", version))
            return bool(self.client.renamenx(staging, self.key("table", version)))
        finally:
            self.client.delete(staging)

    def table_ids(self, version: str) -> set[str]:
        return {field.decode() for field in self.client.hkeys(self.key("table", version))}  # type: ignore[union-attr]

    def drop_table(self, version: str) -> None:
        self.client.unlink(self.key("table", version), self.key("table-texts", version))

    def count_items(self, version: str) -> int:
        return int(self.client.hlen(self.key("table", version)))

    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        return self.client.hmget(self.key("table", version), list(ids))  # type: ignore[return-value]

    def add_vectors(
        self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int, texts: Sequence[str] | None = None
    ) -> None:
        """Writes rows (and, given the texts they were encoded from, their digests) in one transaction."""
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, *([texts] if texts is not None else []))
        if not len(ids):
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key("table", version), mapping=dict(zip(ids, rows, strict=True)))
        if texts is not None:
            digests = {i: text_digest(t) for i, t in zip(ids, texts, strict=True)}
            pipe.hset(self.key("table-texts", version), mapping=digests)  # type: ignore[arg-type]
        pipe.execute()

    def text_digests(self, version: str, ids: Sequence[str]) -> dict[str, str]:
        """Digests of the texts these rows were encoded from, for rows written with one (see text_digest)."""
        if not ids:
            return {}
        values = self.client.hmget(self.key("table-texts", version), list(ids))
        return {i: v.decode() for i, v in zip(ids, values, strict=True) if v is not None}  # type: ignore[union-attr]

    def texts(self, task: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.key("texts", task)).items()}  # type: ignore[union-attr]

    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.key("texts", task), item_id)
        pipe.hget(self.key("table", version), item_id)
        text, vector = pipe.execute()
        return (text.decode() if text is not None else None), vector

    def put_items(
        self,
        task: str,
        version: str,
        ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        dim: int,
        metadata: Sequence[dict] | None = None,
    ) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, texts)
        metas = metadata_rows(ids, metadata)
        args: list = [version]
        for item_id, row, text, meta in zip(ids, rows, texts, metas, strict=True):
            args += [item_id, row, text, meta, text_digest(text)]
        keys = [
            self.key("active", task),
            self.key("table", version),
            self.key("texts", task),
            self.key("meta", task),
            self.key("changes", task),
            self.key("changeseq", task),
            self.key("table-texts", version),
        ]
        if not self._put_items(keys=keys, args=args):
            raise StaleVersion(f"{version} is no longer the active {task} version")

    def item_metadata(self, task: str, ids: Sequence[str] | None = None) -> dict[str, dict]:
        """Metadata of API-added items (all of the task's, or those of `ids` that have any)."""
        if ids is None:
            raw = self.client.hgetall(self.key("meta", task))
            return {k.decode(): _decode_metadata(v) for k, v in raw.items()}  # type: ignore[union-attr]
        if not ids:
            return {}
        values = self.client.hmget(self.key("meta", task), list(ids))
        return {i: _decode_metadata(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def item_changes(self, task: str, after: int) -> tuple[int, list[str]]:
        """(newest sequence number, ids of the task's items added or updated after sequence number `after`)."""
        pairs: list[tuple[bytes, float]] = self.client.zrangebyscore(  # type: ignore[assignment]
            self.key("changes", task), f"({after}", "+inf", withscores=True
        )
        if not pairs:
            return after, []
        return int(pairs[-1][1]), [member.decode() for member, _ in pairs]


class SqliteItems:
    _lock: threading.RLock
    _db: sqlite3.Connection
    _query: Callable[..., list[tuple]]
    _transaction: Callable[..., Any]

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
            cursor.execute("DELETE FROM vector_texts WHERE version = ?", (version,))
            cursor.execute("DELETE FROM tables WHERE version = ?", (version,))

        self._transaction(drop)

    def count_items(self, version: str) -> int:
        return self._query("SELECT COUNT(*) FROM vectors WHERE version = ?", (version,))[0][0]

    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        sql = "SELECT item_id, vector FROM vectors WHERE version = ? AND item_id IN ({marks})"
        found: dict[str, bytes] = dict(self._rows_for_ids(sql, version, ids))
        return [found.get(item_id) for item_id in ids]

    def _rows_for_ids(self, sql: str, key: str, ids: Sequence[str]) -> list[tuple]:
        """Rows of `sql` (`... WHERE <column> = ? AND item_id IN ({marks})`, bound to `key` and the ids) for the
        unique ids, in chunks under sqlite's parameter limit, all read under one hold of the lock."""
        unique = list(dict.fromkeys(ids))
        rows: list[tuple] = []
        with self._lock:
            for start in range(0, len(unique), _MAX_PARAMS):
                chunk = unique[start : start + _MAX_PARAMS]
                rows += self._db.execute(sql.format(marks=",".join("?" * len(chunk))), (key, *chunk)).fetchall()
        return rows

    def add_vectors(
        self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int, texts: Sequence[str] | None = None
    ) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, *([texts] if texts is not None else []))

        def add(cursor: sqlite3.Cursor) -> None:
            cursor.executemany(
                "INSERT OR REPLACE INTO vectors (version, item_id, vector) VALUES (?, ?, ?)",
                ((version, item_id, row) for item_id, row in zip(ids, rows, strict=True)),
            )
            if texts is not None:
                _record_digests(cursor, version, ids, texts)

        self._transaction(add)

    def text_digests(self, version: str, ids: Sequence[str]) -> dict[str, str]:
        sql = "SELECT item_id, digest FROM vector_texts WHERE version = ? AND item_id IN ({marks})"
        return dict(self._rows_for_ids(sql, version, ids))

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
        self,
        task: str,
        version: str,
        ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        dim: int,
        metadata: Sequence[dict] | None = None,
    ) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, texts)
        metas = metadata_rows(ids, metadata)

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
            _record_digests(cursor, version, ids, texts)
            cursor.executemany(
                "INSERT OR REPLACE INTO item_meta (task, item_id, meta) VALUES (?, ?, ?)",
                ((task, item_id, meta) for item_id, meta in zip(ids, metas, strict=True)),
            )
            for item_id in ids:  # a new sequence number per change; one row per item
                cursor.execute("DELETE FROM item_changes WHERE task = ? AND item_id = ?", (task, item_id))
                cursor.execute("INSERT INTO item_changes (task, item_id) VALUES (?, ?)", (task, item_id))

        self._transaction(put)

    def item_metadata(self, task: str, ids: Sequence[str] | None = None) -> dict[str, dict]:
        if ids is None:
            rows = self._query("SELECT item_id, meta FROM item_meta WHERE task = ?", (task,))
            return {item_id: _decode_metadata(meta) for item_id, meta in rows}
        sql = "SELECT item_id, meta FROM item_meta WHERE task = ? AND item_id IN ({marks})"
        return {item_id: _decode_metadata(meta) for item_id, meta in self._rows_for_ids(sql, task, ids)}

    def item_changes(self, task: str, after: int) -> tuple[int, list[str]]:
        rows = self._query(
            "SELECT seq, item_id FROM item_changes WHERE task = ? AND seq > ? ORDER BY seq", (task, after)
        )
        if not rows:
            return after, []
        return int(rows[-1][0]), [item_id for _, item_id in rows]


def _record_digests(cursor: sqlite3.Cursor, version: str, ids: Sequence[str], texts: Sequence[str]) -> None:
    cursor.executemany(
        "INSERT OR REPLACE INTO vector_texts (version, item_id, digest) VALUES (?, ?, ?)",
        ((version, item_id, text_digest(text)) for item_id, text in zip(ids, texts, strict=True)),
    )
