"""The store on a Redis server.

Redis layout ({p} is the key prefix, "gramrec:" by default; versions, tasks and item ids never contain ':',
'*', '{', '}' or whitespace, so no key can reach into another):

    {p}table:{version}         hash   item_id -> D float32 (little-endian bytes): that version's item table
    {p}table-texts:{version}   hash   item_id -> digest of the text the row was encoded from (rows written
                                      after the bulk load: API-added and re-encoded items)
    {p}staging:{version}:{hex} hash   a table being bulk-loaded; RENAMENX'd to {p}table:{version} when complete,
                                      so a half-loaded table is never visible
    {p}active:{task}           string the active version of task "kt" or "nr"; changed only by compare-and-set
    {p}texts:{task}            hash   item_id -> text, of items added through the API (re-encoded at retrains
                                      and when another version is activated)
    {p}interactions:{task}     stream logged answers (kt) and impressions (nr), the feed of future retrains;
                                      its compacted head is trimmed (the entries live on in Parquet segments);
                                      its consumer group `compacted` (never read through) holds, as its last
                                      delivered id, the compacted id the stream was checked against (id floor)
    {p}log-segments            string the folder of the interaction log's Parquet segments (set by the trainer)
    {p}jobs                    hash   job_id -> JSON job record
    {p}retrain-queue           list   job ids waiting for the trainer worker (LPUSH by the API and the scheduler,
                                      RPOP by the trainer that holds the retrain lock)
    {p}retrain-pending:{task}  string the task's job waiting in the queue: a second trigger joins it
    {p}retrain-current         string the job the lock holder runs; found by the next holder if that one died
    {p}lock:{name}             string a lease (redis-py Lock: token, TTL renewed by its holder)
    {p}tick:{task}:{time}      string a schedule tick already turned into a job by one trainer replica
    {p}beacons:{kind}          hash   name -> JSON {expires_at, record}: trainer heartbeats, first-start progress
    {p}events                  pubsub "task version" on every activation (API workers swap at once)

Round trips: a prediction reads its items with one HMGET; GET /items reads text and vector in one pipeline;
POST /items writes vectors and texts in one Lua script that first checks the active pointer still names the
version they were encoded for (else StaleVersion); activation is a Lua compare-and-set on the pointer which, for
a retrain, also checks that the caller still holds the retrain lease (a job that lost its lock cannot activate).
"""

from __future__ import annotations

import logging

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from gramrec.service.store.beacons import RedisBeacons
from gramrec.service.store.interactions import _RAISE_FLOOR, _REISSUE, RedisInteractions
from gramrec.service.store.items import _CAS, _PUT_ITEMS, RedisItems
from gramrec.service.store.jobs import _ENQUEUE, _FINISH_CURRENT, _NEXT_JOB, RedisJobs
from gramrec.service.store.leases import RedisLeases

log = logging.getLogger("gramrec.service")


class RedisStore(RedisItems, RedisInteractions, RedisJobs, RedisLeases, RedisBeacons):
    """The store on a Redis server (the layout is in this module's docstring). Thread-safe: a pooled client."""

    def __init__(self, client: redis.Redis, prefix: str = "gramrec:"):
        self.client = client
        self.prefix = prefix
        self._cas = client.register_script(_CAS)
        self._put_items = client.register_script(_PUT_ITEMS)
        self._enqueue = client.register_script(_ENQUEUE)
        self._next_job = client.register_script(_NEXT_JOB)
        self._finish_current = client.register_script(_FINISH_CURRENT)
        self._raise_floor = client.register_script(_RAISE_FLOOR)
        self._reissue = client.register_script(_REISSUE)

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
    return config  # type: ignore[return-value]
