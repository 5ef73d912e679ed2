"""A request body must be JSON and say so: anything else is a 415 that names the Content-Type header.

Without it, a body sent with no Content-Type (curl -d without -H) reached validation as a string and got
"Input should be a valid dictionary", which does not point at the header. Pure ASGI middleware; requests without
a body (GET, POST /admin/models/{version}/activate) pass untouched.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JsonContentTypeMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        has_body = "chunked" in headers.get("transfer-encoding", "").lower() or (length not in (None, "", "0"))
        content_type = headers.get("content-type")
        if not has_body or (content_type is not None and is_json(content_type)):
            await self.app(scope, receive, send)
            return
        got = f"got {content_type!r}" if content_type else "the header is missing"
        detail = f"the request body must be JSON: send the header 'Content-Type: application/json' ({got})"
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 415,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
