"""The item table: every item's embedding for each model version, plus the state the API shares between processes.

A request reads all its items at once, so a vector is stored as raw little-endian float32 bytes (no JSON) and
decoded with one np.frombuffer. Two backends with one interface: Redis (RedisStore, below) and, when no Redis
URL is configured, an in-process sqlite file (service.embedded_store.EmbeddedStore).

Redis layout ({p} is the key prefix, "gramrec:" by default; versions, tasks and item ids never contain ':',
'*', '{', '}' or whitespace, so no key can reach into another):

    {p}table:{version}         hash   item_id -> D float32 (little-endian bytes): that version's item table
    {p}staging:{version}:{hex} hash   a table being bulk-loaded; RENAMENX'd to {p}table:{version} when complete,
                                      so a half-loaded table is never visible
    {p}active:{task}           string the active version of task "kt" or "nr"; changed only by compare-and-set
    {p}texts:{task}            hash   item_id -> text, of items added through the API (re-encoded at retrains
                                      and when another version is activated)
    {p}interactions:{task}     stream logged answers (kt) and impressions (nr), the feed of future retrains
    {p}jobs                    hash   job_id -> JSON job record
    {p}retrain-queue           list   job ids waiting for the retrain worker (LPUSH here, BRPOP there)

Round trips: a prediction reads its items with one HMGET; GET /items reads text and vector in one pipeline;
POST /items writes vectors and texts in one Lua script that first checks the active pointer still names the
version they were encoded for (else StaleVersion); activation is a Lua compare-and-set on the pointer.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.settings import ServiceSettings

log = logging.getLogger("gramrec.service")

LOAD_CHUNK = 1000  # items per HSET while bulk-loading a table
_CHUNKS_PER_ROUND_TRIP = 8


class StoreError(RuntimeError):
    """The store cannot be reached or answered unexpectedly."""


# What a store call raises when the store is away or broken (not the caller's fault): 503s, retried by the poll.
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, redis.RedisError, sqlite3.Error)


class StaleVersion(RuntimeError):
    """A write was prepared for a version that is no longer the active one."""


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


def same_length(ids: Sequence[str], *columns: Sequence) -> None:
    if any(len(column) != len(ids) for column in columns):
        raise ValueError(f"{len(ids)} item ids, but columns of lengths {[len(c) for c in columns]}")


def decode_rows(rows: Sequence[bytes | None], dim: int) -> tuple[np.ndarray, list[int]]:
    """Raw rows as read from the store -> ([n, dim] float32 matrix with zero rows for absent items, absent indices)."""
    missing = [i for i, row in enumerate(rows) if row is None]
    width = 4 * dim
    if missing:
        rows = [b"\0" * width if row is None else row for row in rows]
    if any(len(row) != width for row in rows):
        raise StoreError(f"item table holds vectors of the wrong size (expected {dim} float32)")
    matrix = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim)
    return matrix, missing


class Store(Protocol):
    """What the API needs from its shared state; both backends implement it."""

    def ping(self) -> bool: ...
    def close(self) -> None: ...

    def active_version(self, task: str) -> str | None: ...
    def compare_and_set_active(self, task: str, expected: str | None, new: str) -> bool: ...

    def has_table(self, version: str) -> bool: ...
    def load_table(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> bool: ...
    def table_ids(self, version: str) -> set[str]: ...
    def count_items(self, version: str) -> int: ...
    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]: ...
    def add_vectors(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> None: ...

    def texts(self, task: str) -> dict[str, str]: ...
    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]: ...
    def put_items(
        self, task: str, version: str, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, dim: int
    ) -> None: ...

    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]: ...
    def read_interactions(self, task: str, count: int = 100) -> list[tuple[str, dict[str, str]]]: ...

    def enqueue_job(self, job: dict) -> None: ...
    def get_job(self, job_id: str) -> dict | None: ...


_CAS = """
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: active pointer, table, texts. ARGV: version, then (id, vector, text) triples.
_PUT_ITEMS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
end
return 1
"""


class RedisStore:
    """The store on a Redis server (the layout is in this module's docstring). Thread-safe: a pooled client."""

    def __init__(self, client: redis.Redis, prefix: str = "gramrec:"):
        self.client = client
        self.prefix = prefix
        self._cas = client.register_script(_CAS)
        self._put_items = client.register_script(_PUT_ITEMS)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "gramrec:",
        timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        retries: int = 1,
    ) -> RedisStore:
        return cls(redis_client(url, timeout_s, connect_timeout_s, retries), prefix)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.client.close()

    # -- active pointers ------------------------------------------------------------------------------------------
    def active_version(self, task: str) -> str | None:
        value = self.client.get(self.key("active", task))
        return value.decode() if value is not None else None

    def compare_and_set_active(self, task: str, expected: str | None, new: str) -> bool:
        return bool(self._cas(keys=[self.key("active", task)], args=[expected or "", new]))

    # -- tables ---------------------------------------------------------------------------------------------------
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
            return bool(self.client.renamenx(staging, self.key("table", version)))
        finally:
            self.client.delete(staging)

    def table_ids(self, version: str) -> set[str]:
        return {field.decode() for field in self.client.hkeys(self.key("table", version))}

    def count_items(self, version: str) -> int:
        return int(self.client.hlen(self.key("table", version)))

    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        return self.client.hmget(self.key("table", version), list(ids))

    def add_vectors(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows)
        if len(ids):
            self.client.hset(self.key("table", version), mapping=dict(zip(ids, rows, strict=True)))

    # -- items added through the API --------------------------------------------------------------------------------
    def texts(self, task: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.key("texts", task)).items()}

    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.key("texts", task), item_id)
        pipe.hget(self.key("table", version), item_id)
        text, vector = pipe.execute()
        return (text.decode() if text is not None else None), vector

    def put_items(
        self, task: str, version: str, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, dim: int
    ) -> None:
        rows = vector_rows(vectors, dim)
        same_length(ids, rows, texts)
        args: list = [version]
        for item_id, row, text in zip(ids, rows, texts, strict=True):
            args += [item_id, row, text]
        keys = [self.key("active", task), self.key("table", version), self.key("texts", task)]
        if not self._put_items(keys=keys, args=args):
            raise StaleVersion(f"{version} is no longer the active {task} version")

    # -- interactions and jobs ----------------------------------------------------------------------------------------
    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]:
        pipe = self.client.pipeline(transaction=True)
        for record in records:
            pipe.xadd(self.key("interactions", task), record)
        return [stream_id.decode() for stream_id in pipe.execute()]

    def read_interactions(self, task: str, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        entries = self.client.xrange(self.key("interactions", task), count=count)
        return [(i.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for i, fields in entries]

    def enqueue_job(self, job: dict) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key("jobs"), job["id"], json.dumps(job))
        pipe.lpush(self.key("retrain-queue"), job["id"])
        pipe.execute()

    def get_job(self, job_id: str) -> dict | None:
        record = self.client.hget(self.key("jobs"), job_id)
        return json.loads(record) if record is not None else None


def redis_client(url: str, timeout_s: float, connect_timeout_s: float, retries: int) -> redis.Redis:
    """A pooled client whose every call ends within about (retries + 1) x timeout, so a request never hangs.

    redis-py's defaults (5 s timeouts, 10 retries with backoff, timeouts retried too) let one call on a hung Redis
    block for a minute. Here only connection errors are retried, a few ms apart: they are what a Redis restart
    leaves in the pool (stale sockets), and a retry on a fresh connection then succeeds at once. A timeout is not
    retried: the command may have run (an XADD twice would log an interaction twice), and waiting longer on a
    server that does not answer only holds the request.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=retry,
        health_check_interval=30,
    )


def warn_unless_durable(store: RedisStore) -> dict[str, str] | None:
    """Logs a warning when Redis may lose acknowledged writes in a crash; returns its persistence settings.

    A 201 from POST /interactions means "stored"; that holds through a Redis crash only with the AOF on and fsynced
    before Redis replies (appendfsync always). With `everysec` a host crash loses up to a second of acknowledged
    entries; with no AOF, a restart loses everything since the last snapshot. Managed Redis often forbids CONFIG:
    then nothing is known and nothing is said.
    """
    try:
        config = store.client.config_get("append*")  # {"appendonly": "yes", "appendfsync": "always", ...}
    except redis.RedisError:
        return None
    if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
        log.warning(
            "Redis may lose acknowledged interactions in a crash: run it with --appendonly yes --appendfsync always",
            extra={"appendonly": config.get("appendonly"), "appendfsync": config.get("appendfsync")},
        )
    return config


def open_store(settings: ServiceSettings) -> Store:
    """Redis when a URL is configured, else the embedded sqlite store."""
    if settings.redis_url:
        store = RedisStore.from_url(
            settings.redis_url,
            settings.redis_key_prefix,
            timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
            retries=settings.redis_retries,
        )
        warn_unless_durable(store)
        return store
    from service.embedded_store import EmbeddedStore

    return EmbeddedStore(settings.embedded_store_path)
