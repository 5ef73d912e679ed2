"""Leases (a named lock with an expiry its holder renews) and schedule ticks, on Redis and on sqlite."""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
from redis.lock import Lock


class Lease(Protocol):
    """A named lock with an expiry that its holder keeps renewing; if the holder dies, it expires."""

    key: str
    token: str

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...


class Leases(Protocol):
    def lease(self, name: str, ttl_s: float) -> Lease: ...
    def claim_tick(self, task: str, tick: str, ttl_s: float) -> bool: ...


class RedisLeases:
    client: redis.Redis
    key: Callable[..., str]

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


class SqliteLeases:
    _lock: threading.RLock
    _db: sqlite3.Connection
    _query: Callable[..., list[tuple]]
    _transaction: Callable[..., Any]

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

    def __init__(self, store: SqliteLeases, key: str, ttl_s: float):
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
