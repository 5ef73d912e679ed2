"""Beacons: small JSON records with an expiry that their writer keeps refreshing (a heartbeat, a progress report).

Two kinds use them: `first-start` (one record per task while a process trains its first model: phase, progress,
rate, ETA; read by every API process's /readyz) and `trainer` (one record per live `gramrec trainer`: read by the
admin API to say when no trainer is alive). A record whose writer died stops being refreshed and expires.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

FIRST_START = "first-start"  # one per task being bootstrapped: its progress (trainer/bootstrap.py)
TRAINERS = "trainer"  # one per live `gramrec trainer`: its heartbeat (trainer/retrain/worker.py)


class Beacons(Protocol):
    def put_beacon(self, kind: str, name: str, record: dict, ttl_s: float) -> None: ...
    def beacons(self, kind: str) -> dict[str, dict]: ...
    def drop_beacon(self, kind: str, name: str) -> None: ...


def _live(raw: dict[str, str], now: float) -> tuple[dict[str, dict], list[str]]:
    """Unexpired records by name, and the names of expired (or unreadable) ones."""
    live, dead = {}, []
    for name, value in raw.items():
        try:
            entry = json.loads(value)
            expires_at, record = float(entry["expires_at"]), entry["record"]
        except (ValueError, KeyError, TypeError):
            dead.append(name)
            continue
        if expires_at < now:
            dead.append(name)
        else:
            live[name] = record
    return live, dead


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBeacons:
    """{p}beacons:{kind}: a hash name -> {"expires_at", "record"} (readers drop the expired fields)."""

    client: redis.Redis
    key: Callable[..., str]

    def put_beacon(self, kind: str, name: str, record: dict, ttl_s: float) -> None:
        entry = json.dumps({"expires_at": time.time() + ttl_s, "record": record}, default=str)
        self.client.hset(self.key("beacons", kind), name, entry)

    def beacons(self, kind: str) -> dict[str, dict]:
        raw: dict = self.client.hgetall(self.key("beacons", kind))
        text = {_text(name): _text(value) for name, value in raw.items()}
        live, dead = _live(text, time.time())
        if dead:
            self.client.hdel(self.key("beacons", kind), *dead)
        return live

    def drop_beacon(self, kind: str, name: str) -> None:
        self.client.hdel(self.key("beacons", kind), name)


class SqliteBeacons:
    """Rows of the `flags` table named beacon:{kind}:{name}, with their expiry."""

    _lock: threading.RLock
    _query: Callable[..., list[tuple]]
    _transaction: Callable[..., Any]

    def put_beacon(self, kind: str, name: str, record: dict, ttl_s: float) -> None:
        entry = json.dumps({"expires_at": time.time() + ttl_s, "record": record}, default=str)
        self._transaction(
            lambda cursor: cursor.execute(
                "INSERT OR REPLACE INTO flags (name, value, expires_at) VALUES (?, ?, ?)",
                (f"beacon:{kind}:{name}", entry, time.time() + ttl_s),
            )
        )

    def beacons(self, kind: str) -> dict[str, dict]:
        prefix = f"beacon:{kind}:"
        rows = self._query("SELECT name, value FROM flags WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        live, _ = _live({name[len(prefix) :]: value for name, value in rows}, time.time())
        return live

    def drop_beacon(self, kind: str, name: str) -> None:
        self._transaction(lambda cursor: cursor.execute("DELETE FROM flags WHERE name = ?", (f"beacon:{kind}:{name}",)))
