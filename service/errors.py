"""The root of every domain error: anything gramrec raises on purpose derives from GramrecError.

The HTTP API maps domain errors to statuses in one place (service/http_errors.py); the CLI prints any of them as
`gramrec: error: ...` with exit code 2. Each error also keeps the builtin base it had before (ValueError,
LookupError, RuntimeError), so code that catches those still does.
"""

from __future__ import annotations


class GramrecError(Exception):
    """A failure gramrec detected and can explain: bad input, a bad artifact, a lost lease, a missing version."""
