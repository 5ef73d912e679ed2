"""What a store call raises: domain errors of the shared state, and the backends' own failures."""

from __future__ import annotations

import sqlite3

import redis

from gramrec.service.errors import GramrecError


class StoreError(GramrecError, RuntimeError):
    """The store cannot be reached or answered unexpectedly."""


STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, redis.RedisError, sqlite3.Error)


class StaleVersion(GramrecError, RuntimeError):
    """A write was prepared for a version that is no longer the active one."""


class LeaseLost(GramrecError, RuntimeError):
    """The caller's lease expired or another process holds it now."""
