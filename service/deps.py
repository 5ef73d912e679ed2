"""Dependencies that hand endpoints the app's shared objects (created once, in the app's lifespan).

They are `async def` on purpose: trivial lookups, so FastAPI calls them on the event loop instead of paying a
threadpool hop per dependency on the hot path. (No `from __future__ import annotations` here: FastAPI resolves a
dependency's annotations at runtime, and `served`'s refer to its argument.)
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Served:
    """A checked request body and the ActiveModel of its task, taken once before the endpoint runs and used to the
    end, so a response never mixes two versions."""

    body: Any
    model: ActiveModel


def served(checked_body: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Served]]:
    """A dependency giving the body that `checked_body` parses and checks, with its task's model. The endpoint takes
    the body only through it: a second path to `checked_body` would validate the body twice (FastAPI does not
    share it between the two; measured)."""

    async def served_request(
        body: Annotated[Any, Depends(checked_body)], registry: Annotated[ModelRegistry, Depends(get_registry)]
    ) -> Served:
        return Served(body, require_model(registry, body.task))

    return served_request
