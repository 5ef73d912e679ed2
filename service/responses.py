"""A response model written as JSON in one pass by pydantic-core, for the hot endpoints.

An endpoint that returns a model makes FastAPI validate it again against the response model, turn it into Python
objects and hand those to `json.dumps`. `ModelJSONResponse` writes the already-typed model straight to JSON bytes
(pydantic-core, Rust); the route keeps `response_model=` for its OpenAPI schema.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import to_json
from starlette.responses import Response


class ModelJSONResponse(Response):
    media_type = "application/json"

    def __init__(self, model: BaseModel, status_code: int = 200) -> None:
        super().__init__(content=to_json(model), status_code=status_code)
