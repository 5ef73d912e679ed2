"""Error responses, all mapped here: every failure is JSON with a `detail`; no internal error leaks its message.

Domain errors (service/errors.py and the errors of the store, the artifact format and activation) get their
status here, not in the routes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gramrec.service.activation import ActivationConflict, VersionNotFound
from gramrec.service.artifact import ArtifactError
from gramrec.service.catalog import IndexFull
from gramrec.service.errors import BodyTooLarge, UnknownItems
from gramrec.service.store import STORE_ERRORS

log = logging.getLogger("gramrec.service")


class LogThrottle:
    """At most one log line per key and `interval_s`: an outage under load fails every request, and one line per
    failure would flood the log (the metrics count each one). The line that is let through says how many were not."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: stay quiet; else log now, with this many lines suppressed since the last one."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] += 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


_store_errors_log = LogThrottle()


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing inputs: an input may be NaN (not JSON) or megabytes long."""
    errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": _message(e)} for e in exc.errors()]
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": errors})


def _message(error: dict) -> str:
    """The error's message; a JSON syntax error also says what is wrong ("Expecting ',' delimiter")."""
    reason = (error.get("ctx") or {}).get("error")
    if error["type"] == "json_invalid" and isinstance(reason, str):
        return f"{error['msg']}: {reason}"
    return error["msg"]


# Why FastAPI could not read a JSON body, by the exception it wraps in its generic 400 "error parsing the body".
_UNREADABLE_BODY = (
    (UnicodeDecodeError, "request body is not valid UTF-8"),
    (RecursionError, "request body JSON is nested too deeply"),
    (ValueError, "request body JSON has a number too long to parse"),  # int() digit limit
)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's handler, except that a body it could not parse gets a status and message naming the problem."""
    cause = exc.__cause__
    if isinstance(cause, BodyTooLarge):
        return JSONResponse(status_code=status.HTTP_413_CONTENT_TOO_LARGE, content={"detail": str(cause)})
    if exc.status_code == status.HTTP_400_BAD_REQUEST and cause is not None:
        for kind, message in _UNREADABLE_BODY:
            if isinstance(cause, kind):
                error = {"type": "json_invalid", "loc": ["body"], "msg": message}
                return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": [error]})
    return await http_exception_handler(request, exc)


async def _unknown_items(request: Request, exc: UnknownItems) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": {"msg": f"unknown items: {exc.reason}", "unknown_items": exc.item_ids}},
    )


async def _version_not_found(request: Request, exc: VersionNotFound) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": str(exc)})


async def _artifact_error(request: Request, exc: ArtifactError) -> JSONResponse:
    """A version that does not load (bad checksum, malformed files): the active one keeps serving."""
    version = request.path_params.get("version") or Path(exc.where).name
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": f"version {version} does not load: {exc.problem}"},
    )


async def _index_full(request: Request, exc: IndexFull) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_507_INSUFFICIENT_STORAGE, content={"detail": str(exc)})


async def _activation_conflict(request: Request, exc: ActivationConflict) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(exc)})


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    kind = type(exc).__name__
    request.app.state.metrics.store_errors.labels(kind).inc()
    suppressed = _store_errors_log.allow(kind)
    if suppressed is not None:
        extra = {"path": request.url.path, "error": f"{kind}: {exc}", "suppressed": suppressed}
        log.error("item store error", extra=extra)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "item store unavailable"},
        headers={"Retry-After": "1"},  # outages seen so far end in seconds (restart, failover)
    )


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path}, exc_info=exc)
    return JSONResponse(status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, content={"detail": "internal error"})


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(UnknownItems, _unknown_items)  # type: ignore[arg-type]
    app.add_exception_handler(VersionNotFound, _version_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(ArtifactError, _artifact_error)  # type: ignore[arg-type]
    app.add_exception_handler(ActivationConflict, _activation_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(IndexFull, _index_full)  # type: ignore[arg-type]
    for error in STORE_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(Exception, _internal)
