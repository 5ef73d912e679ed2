"""Dependencies that hand endpoints the app's shared objects (created once, in the app's lifespan).

They are `async def` on purpose: trivial lookups, so FastAPI calls them on the event loop instead of paying a
threadpool hop per dependency on the hot path. (No `from __future__ import annotations` here: FastAPI resolves a
dependency's annotations at runtime, and `model_for`'s refer to its argument.)
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

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


def model_for(checked_body: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[ActiveModel]]:
    """A dependency giving the ActiveModel of the task named by the body that `checked_body` parses and checks.

    Taken once, before the endpoint runs, and used to the end, so a response never mixes two versions. FastAPI
    caches `checked_body` within a request, so an endpoint that also takes the body parses it once.
    """

    async def active_model(
        body: Annotated[Any, Depends(checked_body)], registry: Annotated[ModelRegistry, Depends(get_registry)]
    ) -> ActiveModel:
        return require_model(registry, body.task)

    return active_model
