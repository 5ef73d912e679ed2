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
    {p}retrain-queue           list   job ids waiting for the trainer worker (LPUSH by the API and the scheduler,
                                      RPOP by the trainer that holds the retrain lock)
    {p}retrain-pending:{task}  string the task's job waiting in the queue: a second trigger joins it
    {p}retrain-current         string the job the lock holder runs; found by the next holder if that one died
    {p}lock:{name}             string a lease (redis-py Lock: token, TTL renewed by its holder)
    {p}tick:{task}:{time}      string a schedule tick already turned into a job by one trainer replica
    {p}events                  pubsub "task version" on every activation (API workers swap at once)

Round trips: a prediction reads its items with one HMGET; GET /items reads text and vector in one pipeline;
POST /items writes vectors and texts in one Lua script that first checks the active pointer still names the
version they were encoded for (else StaleVersion); activation is a Lua compare-and-set on the pointer which, for
a retrain, also checks that the caller still holds the retrain lease (a job that lost its lock cannot activate).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.lock import Lock
from redis.retry import Retry

from gramrec.service.settings import ServiceSettings

log = logging.getLogger("gramrec.service")

LOAD_CHUNK = 1000  # items per HSET while bulk-loading a table
_CHUNKS_PER_ROUND_TRIP = 8


class StoreError(RuntimeError):
    """The store cannot be reached or answered unexpectedly."""


# What a store call raises when the store is away or broken (not the caller's fault): 503s, retried by the poll.
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, redis.RedisError, sqlite3.Error)


class StaleVersion(RuntimeError):
    """A write was prepared for a version that is no longer the active one."""


class LeaseLost(RuntimeError):
    """The caller's lease expired or another process holds it now."""


class Lease(Protocol):
    """A named lock with an expiry that its holder keeps renewing; if the holder dies, it expires."""

    key: str
    token: str

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...


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


def newest_first(records: Sequence[str | bytes]) -> list[dict]:
    """Job records (JSON) parsed and sorted by creation time, newest first."""
    return sorted((json.loads(record) for record in records), key=lambda job: job.get("created_at", ""), reverse=True)


def prunable_jobs(jobs: Sequence[dict], keep: int) -> list[str]:
    """Ids of finished jobs beyond the newest `keep` records (queued and running ones are never dropped)."""
    return [job["id"] for job in jobs[keep:] if job.get("status") not in ("queued", "running")]


class Store(Protocol):
    """What the API needs from its shared state; both backends implement it."""

    def ping(self) -> bool: ...
    def close(self) -> None: ...

    def active_version(self, task: str) -> str | None: ...
    def compare_and_set_active(self, task: str, expected: str | None, new: str, lease: Lease | None = None) -> bool: ...
    def publish_activation(self, task: str, version: str) -> None: ...
    def listen_activations(self, on_activation: Callable[[str, str], None], stop: threading.Event) -> None: ...

    def has_table(self, version: str) -> bool: ...
    def load_table(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> bool: ...
    def table_ids(self, version: str) -> set[str]: ...
    def count_items(self, version: str) -> int: ...
    def get_vectors(self, version: str, ids: Sequence[str]) -> list[bytes | None]: ...
    def add_vectors(self, version: str, ids: Sequence[str], vectors: np.ndarray, dim: int) -> None: ...
    def drop_table(self, version: str) -> None: ...

    def texts(self, task: str) -> dict[str, str]: ...
    def get_item(self, task: str, version: str, item_id: str) -> tuple[str | None, bytes | None]: ...
    def put_items(
        self, task: str, version: str, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, dim: int
    ) -> None: ...

    def log_interactions(self, task: str, records: Sequence[dict[str, str]]) -> list[str]: ...
    def read_interactions(
        self, task: str, count: int = 100, after: str | None = None
    ) -> list[tuple[str, dict[str, str]]]: ...

    def enqueue_job(self, job: dict) -> dict: ...
    def get_job(self, job_id: str) -> dict | None: ...
    def update_job(self, job: dict) -> None: ...
    def list_jobs(self, limit: int = 50) -> list[dict]: ...
    def prune_jobs(self, keep: int = ...) -> None: ...
    def next_job(self) -> dict | None: ...
    def current_job(self) -> str | None: ...
    def finish_current_job(self, job_id: str) -> None: ...
    def lease(self, name: str, ttl_s: float) -> Lease: ...
    def claim_tick(self, task: str, tick: str, ttl_s: float) -> bool: ...


# KEYS: active pointer[, lease]. ARGV: expected ('' for none), new[, lease token].
_CAS = """
if KEYS[2] ~= nil and redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: jobs hash, queue, the task's pending key. ARGV: job id, job JSON. Returns the JSON of the job now waiting.
_ENQUEUE = """
local waiting = redis.call('GET', KEYS[3])
if waiting then
  local record = redis.call('HGET', KEYS[1], waiting)
  if record then return record end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return ARGV[2]
"""

# KEYS: jobs hash, queue, current key. ARGV: pending key prefix. Pops the oldest job and makes it current.
_NEXT_JOB = """
local job_id = redis.call('RPOP', KEYS[2])
if not job_id then return false end
local record = redis.call('HGET', KEYS[1], job_id)
if not record then return false end
local task = cjson.decode(record)['task']
if redis.call('GET', ARGV[1] .. task) == job_id then redis.call('DEL', ARGV[1] .. task) end
redis.call('SET', KEYS[3], job_id)
return record
"""

_FINISH_CURRENT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

MAX_JOB_RECORDS = 500  # older job records are dropped when a job finishes

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
        self._enqueue = client.register_script(_ENQUEUE)
        self._next_job = client.register_script(_NEXT_JOB)
        self._finish_current = client.register_script(_FINISH_CURRENT)

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
            raise LeaseLost(f"lease {lease.key} is no longer held by this process")
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

    def drop_table(self, version: str) -> None:
        self.client.unlink(self.key("table", version))

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

    def read_interactions(
        self, task: str, count: int = 100, after: str | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` logged entries, oldest first, after stream id `after` (exclusive) if given."""
        start = f"({after}" if after else "-"
        entries = self.client.xrange(self.key("interactions", task), min=start, count=count)
        return [(i.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for i, fields in entries]

    def enqueue_job(self, job: dict) -> dict:
        """Queues the job, unless one for the same task is still waiting: then that one is returned instead."""
        keys = [self.key("jobs"), self.key("retrain-queue"), self.key("retrain-pending", job["task"])]
        return json.loads(self._enqueue(keys=keys, args=[job["id"], json.dumps(job)]))

    def get_job(self, job_id: str) -> dict | None:
        record = self.client.hget(self.key("jobs"), job_id)
        return json.loads(record) if record is not None else None

    def update_job(self, job: dict) -> None:
        self.client.hset(self.key("jobs"), job["id"], json.dumps(job))

    def list_jobs(self, limit: int = 50) -> list[dict]:
        """Newest first (by created_at). Finished records beyond MAX_JOB_RECORDS are pruned by the trainer."""
        return newest_first(self.client.hvals(self.key("jobs")))[:limit]

    def prune_jobs(self, keep: int = MAX_JOB_RECORDS) -> None:
        finished = prunable_jobs(newest_first(self.client.hvals(self.key("jobs"))), keep)
        if finished:
            self.client.hdel(self.key("jobs"), *finished)

    def next_job(self) -> dict | None:
        """Pops the oldest queued job and records it as the current one (call only while holding the lease)."""
        keys = [self.key("jobs"), self.key("retrain-queue"), self.key("retrain-current")]
        record = self._next_job(keys=keys, args=[self.key("retrain-pending", "")])
        return json.loads(record) if record else None

    def current_job(self) -> str | None:
        value = self.client.get(self.key("retrain-current"))
        return value.decode() if value is not None else None

    def finish_current_job(self, job_id: str) -> None:
        """Clears the current-job marker if it still names job_id (a trainer that lost its lease must not clear
        the marker of the job its successor runs)."""
        self._finish_current(keys=[self.key("retrain-current")], args=[job_id])

    def lease(self, name: str, ttl_s: float) -> RedisLease:
        return RedisLease(self.client, self.key("lock", name), ttl_s)

    def claim_tick(self, task: str, tick: str, ttl_s: float) -> bool:
        """True for the first caller only: one job per schedule tick, however many trainer replicas tick."""
        return bool(self.client.set(self.key("tick", task, tick), "1", nx=True, px=int(ttl_s * 1000)))


class RedisLease:
    """A lease on a redis-py Lock with our own token, so a Lua script can check who holds it."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float):
        self.key = key
        self.token = secrets.token_hex(16)
        self._lock = Lock(client, key, timeout=ttl_s, thread_local=False)

    def acquire(self) -> bool:
        return bool(self._lock.acquire(blocking=False, token=self.token))

    def renew(self) -> bool:
        """Resets the expiry to the full TTL; False if the lease was lost meanwhile."""
        try:
            return bool(self._lock.reacquire())
        except redis.exceptions.LockError:
            return False

    def release(self) -> None:
        try:
            self._lock.release()
        except redis.exceptions.LockError:
            pass  # already expired or taken over: nothing of ours to release


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
    from gramrec.service.embedded_store import EmbeddedStore

    return EmbeddedStore(settings.embedded_store_path)
