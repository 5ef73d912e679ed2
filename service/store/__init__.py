"""The shared state of the API and the trainer, behind one interface with two backends.

The item table: every item's embedding for each model version, plus the state the API shares between processes.

A request reads all its items at once, so a vector is stored as raw little-endian float32 bytes (no JSON) and
decoded with one np.frombuffer. Two backends with one interface: Redis (store.redis_store.RedisStore) and, when no Redis
URL is configured, an in-process sqlite file (store.sqlite_store.EmbeddedStore).

One module per concern, each holding its protocol and both backends' implementation of it: `items` (active
pointers, item tables, texts of API-added items), `interactions` (the interaction log), `jobs` (the retrain job
queue), `leases` (the retrain and first-start leases, schedule ticks) and `beacons` (trainer heartbeats,
first-start progress). `redis_store` and `sqlite_store` compose them.
"""

from __future__ import annotations

from typing import Protocol

from gramrec.service.settings import ServiceSettings
from gramrec.service.store.beacons import Beacons
from gramrec.service.store.errors import (
    STORE_ERRORS,
    LeaseLost,
    StaleVersion,
    StoreError,
)
from gramrec.service.store.interactions import InteractionLog
from gramrec.service.store.items import ItemStore
from gramrec.service.store.jobs import JobQueue
from gramrec.service.store.leases import Lease, Leases

__all__ = ["STORE_ERRORS", "Lease", "LeaseLost", "StaleVersion", "Store", "StoreError", "open_store"]


class Store(ItemStore, InteractionLog, JobQueue, Leases, Beacons, Protocol):
    """What the API and the trainer need from their shared state; both backends implement it."""

    def ping(self) -> bool: ...
    def close(self) -> None: ...


def open_store(settings: ServiceSettings) -> Store:
    """Redis when a URL is configured, else the embedded sqlite store."""
    if settings.redis_url:
        from gramrec.service.store.redis_store import RedisStore, warn_unless_durable

        store = RedisStore.from_url(
            settings.redis_url,
            settings.redis_key_prefix,
            timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
            retries=settings.redis_retries,
        )
        warn_unless_durable(store)
        return store
    from gramrec.service.store.sqlite_store import EmbeddedStore

    return EmbeddedStore(settings.embedded_store_path)
