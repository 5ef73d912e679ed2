"""Prometheus metrics of one process: requests and latency per endpoint and status, active model and item count.

Each app has its own CollectorRegistry (tests build many apps). With several uvicorn workers every worker
exposes its own numbers; scrape each, or run one worker per container.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ModelCollector(Collector):
    """Read at scrape time, so the numbers are never stale: active version per task, items in its table."""

    def __init__(
        self,
        state: Callable[[], Iterable[tuple[str, str, int | None]]],
        swaps: Callable[[], tuple[int, int, dict[str, dict]]] | None = None,
    ):
        self.state = state  # yields (task, version, item count or None)
        self.swaps = swaps  # (swaps, failed loads, task -> {version, error} of a failed newest load)

    def collect(self):
        if self.swaps is not None:
            swaps, failures, errors = self.swaps()
            yield CounterMetricFamily("gramrec_model_swaps", "model bundles swapped in by this process", value=swaps)
            yield CounterMetricFamily(
                "gramrec_model_load_failures",
                "versions that failed to load or to pass their golden check",
                value=failures,
            )
            failing = GaugeMetricFamily(
                "gramrec_model_load_error",
                "1 while a task's newest version cannot be loaded (an older one serves)",
                labels=["task", "version"],
            )
            for task, error in errors.items():
                failing.add_metric([task, error["version"]], 1)
            yield failing
        active = GaugeMetricFamily(
            "gramrec_active_model", "1 for the active model version of a task", labels=["task", "version"]
        )
        items = GaugeMetricFamily("gramrec_items", "items in the active item table of a task", labels=["task"])
        for task, version, count in self.state():
            active.add_metric([task, version], 1)
            if count is not None:
                items.add_metric([task], count)
        yield active
        yield items


class IndexCollector(Collector):
    """Catalog indexes of this process (POST /recommend): items and resident bytes per task, bounded by
    GRAMREC_INDEX_MAX_BYTES each."""

    def __init__(self, state: Callable[[], Iterable[tuple[str, str, int, int, bool]]]):
        self.state = state  # yields (task, version, items, bytes, approximate)

    def collect(self):
        items = GaugeMetricFamily("gramrec_index_items", "items in the catalog index of a task", labels=["task"])
        size = GaugeMetricFamily(
            "gramrec_index_bytes", "memory of the catalog index of a task in this worker", labels=["task"]
        )
        approx = GaugeMetricFamily(
            "gramrec_index_approximate",
            "1 when the task's catalog index has a quantised scan for unfiltered requests",
            labels=["task"],
        )
        for task, _version, n, nbytes, approximate in self.state():
            items.add_metric([task], n)
            size.add_metric([task], nbytes)
            approx.add_metric([task], int(approximate))
        yield items
        yield size
        yield approx


class KTCacheCollector(Collector):
    """The per-student kt state cache of the active kt version in this worker (service/kt_cache.py): whether clients
    resend growing histories (hits) or send histories the cache never saw (misses), and how full it is."""

    def __init__(self, state: Callable[[], Iterable[tuple[str, int, int, int]]]):
        self.state = state  # yields (version, hits, misses, entries)

    def collect(self):
        hits = CounterMetricFamily(
            "gramrec_kt_cache_hits", "kt requests that continued a cached student state", labels=["version"]
        )
        misses = CounterMetricFamily(
            "gramrec_kt_cache_misses", "kt requests that ran the LSTM over the whole history", labels=["version"]
        )
        entries = GaugeMetricFamily("gramrec_kt_cache_entries", "student states held", labels=["version"])
        for version, n_hits, n_misses, n_entries in self.state():
            hits.add_metric([version], n_hits)
            misses.add_metric([version], n_misses)
            entries.add_metric([version], n_entries)
        yield hits
        yield misses
        yield entries


class InteractionLogCollector(Collector):
    """Entries of each task's interaction log still in the store (the live tail the trainer has not yet compacted
    and trimmed): bounded by the segment size plus what arrives within the retention window."""

    def __init__(self, state: Callable[[], Iterable[tuple[str, int]]]):
        self.state = state  # yields (task, entries)

    def collect(self):
        entries = GaugeMetricFamily(
            "gramrec_interaction_log_entries", "interaction log entries held in the store, per task", labels=["task"]
        )
        for task, n in self.state():
            entries.add_metric([task], n)
        yield entries


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gramrec_http_requests", "HTTP requests", ["method", "endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "gramrec_http_request_duration_seconds",
            "time from request start to the end of the response",
            ["method", "endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "gramrec_store_errors",
            "requests that failed (503) because the item store was unreachable or erred, by error type",
            ["error"],
            registry=self.registry,
        )

    def watch_models(
        self,
        state: Callable[[], Iterable[tuple[str, str, int | None]]],
        swaps: Callable[[], tuple[int, int, dict[str, dict]]] | None = None,
    ) -> None:
        self.registry.register(ModelCollector(state, swaps))


def route_template(scope: Scope, original: Scope) -> str:
    """The matched route's template. FastAPI sets scope["route"] for its API routes only; the docs, openapi.json
    and static mounts are plain Starlette routes, matched here against the app's routes (a 404 stays "unmatched")."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    app = original.get("app")
    for candidate in getattr(app, "routes", ()):
        match, _ = candidate.matches(original)  # the scope as it came in: a mount rewrites root_path
        if match == Match.FULL:
            return getattr(candidate, "path", None) or "unmatched"
    return "unmatched"


class MetricsMiddleware:
    """Labels requests by route template (/items/{task}/{item_id}), never by raw path, to bound label cardinality."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        original = dict(scope)

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            endpoint = route_template(scope, original)
            labels = (scope["method"], endpoint, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
