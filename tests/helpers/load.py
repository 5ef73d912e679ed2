"""A bounded HTTP load for tests: worker threads sending requests to a loopback server, every outcome recorded.

Bounded in requests and in seconds, so a test that forgets to stop it still ends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    n: int  # the request's number, as passed to `request`
    started: float
    elapsed: float
    status: int  # 0: no HTTP answer (connection refused or cut)
    body: str

    @property
    def model_version(self) -> str | None:
        """The answering model version of a successful prediction."""
        return json.loads(self.body).get("model_version") if self.status == 200 else None


class Load:
    """`workers` threads sending `request(client, n)` until stopped, or `max_requests`, or `max_seconds`."""

    def __init__(self, url: str, request: Callable, workers: int = 3, max_requests: int = 3000, max_seconds=40):
        self.url, self.request, self.workers = url, request, workers
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_seconds
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._count = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers)
        self._futures = []

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._count >= self.max_requests or time.monotonic() > self.deadline:
                return None
            self._count += 1
            return self._count

    def _worker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as client:
            while (n := self._next()) is not None:
                start = time.monotonic()
                try:
                    response = self.request(client, n)
                    status, body = response.status_code, response.text
                except httpx.TransportError as exc:
                    status, body = 0, repr(exc)
                outcome = Outcome(n, start, time.monotonic() - start, status, body)
                with self._lock:
                    self.outcomes.append(outcome)
                if status == 0:
                    time.sleep(0.01)

    def __enter__(self) -> Load:
        self._futures = [self._pool.submit(self._worker) for _ in range(self.workers)]
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=30)
        self._pool.shutdown()

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.started and o.started + o.elapsed <= end]
