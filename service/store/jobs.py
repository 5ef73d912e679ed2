"""The retrain job queue: job records, one waiting job per task, the job the lease holder runs."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

MAX_JOB_RECORDS = 500  # older job records are dropped when a job finishes


def newest_first(records: Sequence[str | bytes]) -> list[dict]:
    """Job records (JSON) parsed and sorted by creation time, newest first."""
    return sorted((json.loads(record) for record in records), key=lambda job: job.get("created_at", ""), reverse=True)


def prunable_jobs(jobs: Sequence[dict], keep: int) -> list[str]:
    """Ids of finished jobs beyond the newest `keep` records (queued and running ones are never dropped)."""
    return [job["id"] for job in jobs[keep:] if job.get("status") not in ("queued", "running")]


class JobQueue(Protocol):
    def enqueue_job(self, job: dict) -> dict: ...
    def get_job(self, job_id: str) -> dict | None: ...
    def update_job(self, job: dict) -> None: ...
    def list_jobs(self, limit: int = 50) -> list[dict]: ...
    def prune_jobs(self, keep: int = ...) -> None: ...
    def next_job(self) -> dict | None: ...
    def current_job(self) -> str | None: ...
    def finish_current_job(self, job_id: str) -> None: ...


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


class RedisJobs:
    client: redis.Redis
    key: Callable[..., str]
    _enqueue: Any
    _next_job: Any
    _finish_current: Any

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
        return value.decode() if value is not None else None  # type: ignore[union-attr]

    def finish_current_job(self, job_id: str) -> None:
        """Clears the current-job marker if it still names job_id (a trainer that lost its lease must not clear
        the marker of the job its successor runs)."""
        self._finish_current(keys=[self.key("retrain-current")], args=[job_id])


class SqliteJobs:
    _lock: threading.RLock
    _db: sqlite3.Connection
    _query: Callable[..., list[tuple]]
    _transaction: Callable[..., Any]

    def enqueue_job(self, job: dict) -> dict:
        def enqueue(cursor: sqlite3.Cursor) -> dict:
            waiting = cursor.execute(
                "SELECT jobs.record FROM retrain_pending JOIN jobs ON jobs.id = retrain_pending.job_id "
                "WHERE retrain_pending.task = ?",
                (job["task"],),
            ).fetchone()
            if waiting:
                return json.loads(waiting[0])
            cursor.execute("INSERT INTO jobs (id, record) VALUES (?, ?)", (job["id"], json.dumps(job)))
            cursor.execute("INSERT INTO retrain_queue (job_id) VALUES (?)", (job["id"],))
            cursor.execute(
                "INSERT OR REPLACE INTO retrain_pending (task, job_id) VALUES (?, ?)", (job["task"], job["id"])
            )
            return job

        return self._transaction(enqueue)

    def get_job(self, job_id: str) -> dict | None:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows else None

    def update_job(self, job: dict) -> None:
        self._query("INSERT OR REPLACE INTO jobs (id, record) VALUES (?, ?)", (job["id"], json.dumps(job)))

    def list_jobs(self, limit: int = 50) -> list[dict]:
        return newest_first([record for (record,) in self._query("SELECT record FROM jobs")])[:limit]

    def prune_jobs(self, keep: int = MAX_JOB_RECORDS) -> None:
        finished = prunable_jobs(self.list_jobs(limit=1 << 30), keep)
        self._transaction(lambda cursor: cursor.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in finished]))

    def next_job(self) -> dict | None:
        def pop(cursor: sqlite3.Cursor) -> dict | None:
            row = cursor.execute("SELECT seq, job_id FROM retrain_queue ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            cursor.execute("DELETE FROM retrain_queue WHERE seq = ?", (row[0],))
            record = cursor.execute("SELECT record FROM jobs WHERE id = ?", (row[1],)).fetchone()
            if record is None:
                return None
            job = json.loads(record[0])
            cursor.execute("DELETE FROM retrain_pending WHERE task = ? AND job_id = ?", (job["task"], job["id"]))
            cursor.execute(
                "INSERT OR REPLACE INTO flags (name, value, expires_at) VALUES ('retrain-current', ?, NULL)",
                (job["id"],),
            )
            return job

        return self._transaction(pop)

    def current_job(self) -> str | None:
        rows = self._query("SELECT value FROM flags WHERE name = 'retrain-current'")
        return rows[0][0] if rows else None

    def finish_current_job(self, job_id: str) -> None:
        self._query("DELETE FROM flags WHERE name = 'retrain-current' AND value = ?", (job_id,))
