"""The root of every domain error: anything gramrec raises on purpose derives from GramrecError.

The HTTP API maps domain errors to statuses in one place (service/http_errors.py); the CLI prints any of them as
`gramrec: error: ...` with exit code 2. Each error also keeps the builtin base it had before (ValueError,
LookupError, RuntimeError), so code that catches those still does.
"""

from __future__ import annotations


class GramrecError(Exception):
    """A failure gramrec detected and can explain: bad input, a bad artifact, a lost lease, a missing version."""


class UnknownItems(GramrecError, LookupError):
    """Items absent from the active table, with no text in the request to encode them from (HTTP 422)."""

    def __init__(self, item_ids: list[str], reason: str = "not in the active item table and no text was given"):
        super().__init__(reason)
        self.item_ids = item_ids
        self.reason = reason


class BodyTooLarge(GramrecError):
    """Raised from `receive` once a streamed body passes the limit (FastAPI wraps it in a 400; http_errors.py
    unwraps it into a 413)."""

    def __init__(self, limit: int):
        super().__init__(too_large_detail(limit))
        self.limit = limit


def too_large_detail(limit: int) -> str:
    return f"request body larger than {limit} bytes (limits.max_body_bytes)"
