"""The FastAPI application: `create_app()` for uvicorn's --factory, tests and `gramrec serve`.

At startup (lifespan) it opens the store, loads and warms the active model of each configured task (adopting the
newest exported version of a task that has no active pointer yet, and loading its item table into the store),
then follows activations made by other processes: at once through the store's activation feed (Redis pub/sub),
and by polling every `model_poll_interval_s` as a fallback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from threadpoolctl import threadpool_limits

from gramrec.service.body_limit import BodyLimitMiddleware
from gramrec.service.content_type import JsonContentTypeMiddleware
from gramrec.service.http_errors import add_error_handlers
from gramrec.service.metrics import (
    IndexCollector,
    InteractionLogCollector,
    KTCacheCollector,
    Metrics,
    MetricsMiddleware,
)
from gramrec.service.registry import Bundle, ModelRegistry
from gramrec.service.routers import admin, health, interactions, items, predict, recommend
from gramrec.service.settings import Limits, ServiceSettings
from gramrec.service.store import open_store

log = logging.getLogger("gramrec.service")

DESCRIPTION = """Content-based collaborative filtering: knowledge tracing (`kt`) and news recommendation (`nr`).

Item ids match `^[A-Za-z0-9_.-]{1,128}$`. Every prediction names the `model_version` that made it."""


def create_app(
    settings: ServiceSettings | None = None,
    *,
    load_bundle: Callable[[Path, str], Bundle] | None = None,
    list_versions: Callable[[Path], list[dict]] | None = None,
) -> FastAPI:
    """Builds the app. `load_bundle` and `list_versions` replace service.bundle's (tests use in-memory fakes)."""
    settings = settings or ServiceSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One BLAS thread: /recommend's matrix-vector products run concurrently in the threadpool, and OpenBLAS's
        # threads spinning against each other (measured on 2 busy cores: 51k x 384 in 115 ms instead of 14 ms).
        threadpool_limits(1, user_api="blas")
        store = open_store(settings)
        registry = ModelRegistry.from_settings(store, settings, load_bundle=load_bundle, list_versions=list_versions)
        app.state.store, app.state.registry = store, registry
        try:
            await run_in_threadpool(registry.start)
            registry.start_polling(settings.model_poll_interval_s)
            if settings.follow_activations:
                registry.start_following()
            registry.start_index_refresh(settings.index_refresh_s)
            log.info("serving", extra={"models": {t: m.version for t, m in registry.active().items()}})
            yield
        finally:
            registry.stop()
            store.close()

    app = FastAPIOffline(  # /docs (Swagger UI) and /redoc with their assets served from the package, no CDN
        title="gramrec",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi_with_limits(app, settings.limits)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.metrics = metrics
    metrics.watch_models(lambda: _model_state(app), lambda: _swap_state(app))
    metrics.registry.register(IndexCollector(lambda: _index_state(app)))
    metrics.registry.register(KTCacheCollector(lambda: _kt_cache_state(app)))
    metrics.registry.register(InteractionLogCollector(lambda: _log_state(app, settings.tasks)))

    add_error_handlers(app)
    for router in (predict.router, recommend.router, items.router, interactions.router, admin.router, health.router):
        app.include_router(router)
    app.add_middleware(JsonContentTypeMiddleware)  # 415 naming the Content-Type header
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)  # JSON 413
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# (schema, property) -> the Limits field that caps it: maxItems of lists, maxLength of texts.
_LIMITED = {
    ("KTPredictRequest", "history"): "max_history",
    ("KTPredictRequest", "targets"): "max_targets",
    ("KTPredictRequest", "items"): "max_items_per_request",
    ("NRPredictRequest", "history"): "max_history",
    ("NRPredictRequest", "candidates"): "max_candidates",
    ("NRPredictRequest", "items"): "max_items_per_request",
    ("AddItemsRequest", "items"): "max_items_per_request",
    ("ItemText", "text"): "max_text_chars",
    ("KTInteractions", "events"): "max_events",
    ("NRInteractions", "history"): "max_history",
    ("NRInteractions", "impressions"): "max_events",
}


def _openapi_with_limits(app: FastAPI, limits: Limits) -> dict:
    """The OpenAPI schema with this server's configured request limits (GRAMREC_LIMITS__*) as maxItems/maxLength."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.get("components", {}).get("schemas", {})
        for (model, field), limit in _LIMITED.items():
            prop = components.get(model, {}).get("properties", {}).get(field)
            if prop is not None:
                prop["maxLength" if field == "text" else "maxItems"] = getattr(limits, limit)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if "requestBody" in operation:
                    responses = operation.setdefault("responses", {})
                    responses.setdefault("413", {"description": f"body larger than {limits.max_body_bytes} bytes"})
                    responses.setdefault("415", {"description": "body not sent as Content-Type: application/json"})
        for model in ("KTPredictRequest", "NRPredictRequest", "AddItemsRequest", "KTInteractions", "NRInteractions"):
            if model in components:
                components[model].setdefault("description", "")
                components[model]["description"] += f" Request bodies are at most {limits.max_body_bytes} bytes."
        app.openapi_schema = schema
    return app.openapi_schema


def _model_state(app: FastAPI):
    """(task, version, item count) of each active model, read when /metrics is scraped."""
    registry: ModelRegistry | None = getattr(app.state, "registry", None)
    if registry is None:
        return
    for task, model in registry.active().items():
        try:
            count = registry.store.count_items(model.version)
        except Exception:  # a scrape must not fail because the store is briefly away
            count = None
        yield task, model.version, count


def _log_state(app: FastAPI, tasks: Sequence[str]):
    """(task, entries in the store's interaction log), read when /metrics is scraped."""
    registry: ModelRegistry | None = getattr(app.state, "registry", None)
    if registry is None:
        return
    for task in tasks:
        try:
            yield task, registry.store.count_interactions(task)
        except Exception:  # a scrape must not fail because the store is briefly away
            continue


def _index_state(app: FastAPI):
    """(task, version, items, bytes, approximate) of each active catalog index."""
    registry: ModelRegistry | None = getattr(app.state, "registry", None)
    if registry is None:
        return
    for task, model in registry.active().items():
        if model.index is not None:
            yield task, model.version, len(model.index), model.index.nbytes(), model.index.approximate


def _kt_cache_state(app: FastAPI):
    """(version, hits, misses, entries) of the active kt version's state cache, if it has one."""
    registry: ModelRegistry | None = getattr(app.state, "registry", None)
    model = registry.active().get("kt") if registry is not None else None
    if model is not None and model.kt_cache is not None:
        cache = model.kt_cache
        yield model.version, cache.hits, cache.misses, len(cache)


def _swap_state(app: FastAPI) -> tuple[int, int, dict[str, dict]]:
    registry: ModelRegistry | None = getattr(app.state, "registry", None)
    if registry is None:
        return 0, 0, {}
    return registry.swaps, registry.load_failures, registry.load_errors()
