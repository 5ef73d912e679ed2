"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gramrec.service.deps import get_registry, get_settings, get_store
from gramrec.service.registry import ModelRegistry
from gramrec.service.schemas import Ready
from gramrec.service.settings import ServiceSettings
from gramrec.service.store import STORE_ERRORS, Store
from gramrec.service.store.beacons import FIRST_START

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers; says nothing about models or the store."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a task has no model, or the store does not answer"}})
def readyz(
    registry: Annotated[ModelRegistry, Depends(get_registry)],
    store: Annotated[Store, Depends(get_store)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> Ready:
    """Ready when every configured task has a loaded, warmed model whose item table is in the store.

    `load_errors` names versions that failed to load while an older one kept serving (still ready).
    """
    models = {task: model.version for task, model in registry.active().items()}
    missing = [task for task in settings.tasks if task not in models]
    store_state = _store_state(store, models)
    errors = registry.load_errors()
    if missing or store_state != "ok":
        detail = {"status": "not ready", "missing_tasks": missing, "store": store_state, "load_errors": errors}
        if missing and store_state != "unreachable":
            detail["first_start"] = _first_start(store, missing)
        return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content={"detail": detail})  # type: ignore[return-value]
    return Ready(models=models, load_errors=errors)


def _first_start(store: Store, missing: Sequence[str]) -> dict[str, dict]:
    """Each missing task's first-start progress, as its bootstrapping process publishes it (trainer/bootstrap.py):
    status, phase, done/total, rate, ETA. A task with no entry: nobody is training it (bootstrap off, or waiting)."""
    try:
        progress = store.beacons(FIRST_START)
    except STORE_ERRORS:
        return {}
    return {task: progress.get(task, {"status": "waiting for a model"}) for task in missing}


def _store_state(store: Store, models: dict[str, str]) -> str:
    """ "ok", "unreachable", or "missing item tables" (the store restarted empty or evicted them; the model poll
    reloads them): a table that is gone means every prediction of its task fails, so the process is not ready."""
    if not store.ping():
        return "unreachable"
    try:
        lost = [version for version in models.values() if not store.has_table(version)]
    except STORE_ERRORS:
        return "unreachable"
    return f"missing item tables: {', '.join(lost)}" if lost else "ok"


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
