"""Error responses: every failure is JSON with a `detail`, and no internal error leaks its message or trace."""

from __future__ import annotations

import logging
import sqlite3

import redis
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.item_store import StoreError

log = logging.getLogger("gramrec.service")


class UnknownItems(LookupError):
    """Items absent from the active table, with no text in the request to encode them from."""

    def __init__(self, item_ids: list[str], reason: str = "not in the active item table and no text was given"):
        super().__init__(reason)
        self.item_ids = item_ids
        self.reason = reason


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing inputs: an input may be NaN (not JSON) or megabytes long."""
    errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": errors})


async def _unknown_items(request: Request, exc: UnknownItems) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": {"msg": f"unknown items: {exc.reason}", "unknown_items": exc.item_ids}},
    )


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("item store error", extra={"path": request.url.path, "error": repr(exc)})
    return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content={"detail": "item store unavailable"})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path}, exc_info=exc)
    return JSONResponse(status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, content={"detail": "internal error"})


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(UnknownItems, _unknown_items)
    for error in (StoreError, redis.RedisError, sqlite3.Error):
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(Exception, _internal)
