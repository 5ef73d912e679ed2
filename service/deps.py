"""Dependencies that hand endpoints the app's shared objects (created once, in the app's lifespan).

They are `async def` on purpose: trivial lookups, so FastAPI calls them on the event loop instead of paying a
threadpool hop per dependency on the hot path.
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status

from gramrec.service.registry import ActiveModel, ModelRegistry
from gramrec.service.settings import ServiceSettings
from gramrec.service.store import Store


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def require_model(registry: ModelRegistry, task: str) -> ActiveModel:
    """The task's current (bundle, version), taken once per request; 503 when the task has no model."""
    model = registry.get(task)
    if model is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"no model loaded for task {task!r}: export one into the artifacts directory "
            "or activate one with POST /admin/models/{version}/activate",
        )
    return model
