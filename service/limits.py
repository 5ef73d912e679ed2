"""Size limits from the settings, as dependencies: a request over a limit is a 422 naming the field, before any work.

Formats (id pattern, NaN, unknown fields) are the schemas' job; these are the bounds an operator may tune.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated

from fastapi import Body, Depends
from fastapi.exceptions import RequestValidationError

from gramrec.service.deps import get_settings
from gramrec.service.schemas import (
    RECOMMEND_EXAMPLES,
    AddItemsRequest,
    Interactions,
    ItemText,
    KTInteractions,
    KTPredictRequest,
    NRRecommendRequest,
    PredictRequest,
    RecommendRequest,
)
from gramrec.service.settings import ServiceSettings


class _Checks:
    def __init__(self) -> None:
        self.errors: list[dict] = []

    def at_most(self, loc: tuple, values: Sequence, limit: int) -> None:
        if len(values) > limit:
            self.errors.append(
                {"type": "too_long", "loc": ("body", *loc), "msg": f"at most {limit} entries, got {len(values)}"}
            )

    def unique(self, loc: tuple, ids: Sequence[str]) -> None:
        duplicates = [item_id for item_id, n in Counter(ids).items() if n > 1]
        if duplicates:
            self.errors.append(
                {"type": "duplicate_ids", "loc": ("body", *loc), "msg": f"duplicate ids: {', '.join(duplicates[:20])}"}
            )

    def conflict(self, loc: tuple, msg: str) -> None:
        """Fields that are each valid but not together (a JSON schema cannot say so)."""
        self.errors.append({"type": "conflicting_fields", "loc": ("body", *loc), "msg": msg})

    def texts(self, loc: tuple, items: Sequence[ItemText], max_items: int, max_chars: int) -> None:
        self.at_most(loc, items, max_items)
        self.unique(loc, [item.item_id for item in items])
        for n, item in enumerate(items):
            if len(item.text) > max_chars:
                self.errors.append(
                    {
                        "type": "too_long",
                        "loc": ("body", *loc, n, "text"),
                        "msg": f"at most {max_chars} characters, got {len(item.text)}",
                    }
                )

    def raise_any(self) -> None:
        if self.errors:
            raise RequestValidationError(self.errors)


Settings = Annotated[ServiceSettings, Depends(get_settings)]


async def checked_predict(body: Annotated[PredictRequest, Body()], settings: Settings) -> PredictRequest:
    limits, checks = settings.limits, _Checks()
    checks.at_most(("history",), body.history, limits.max_history)
    if isinstance(body, KTPredictRequest):
        checks.at_most(("targets",), body.targets, limits.max_targets)
        checks.unique(("targets",), body.targets)
    else:
        checks.at_most(("candidates",), body.candidates, limits.max_candidates)
        checks.unique(("candidates",), body.candidates)
    checks.texts(("items",), body.items, limits.max_items_per_request, limits.max_text_chars)
    checks.raise_any()
    return body


async def checked_items(body: AddItemsRequest, settings: Settings) -> AddItemsRequest:
    checks = _Checks()
    checks.texts(("items",), body.items, settings.limits.max_items_per_request, settings.limits.max_text_chars)
    checks.raise_any()
    return body


async def checked_interactions(body: Annotated[Interactions, Body()], settings: Settings) -> Interactions:
    limits, checks = settings.limits, _Checks()
    if isinstance(body, KTInteractions):
        checks.at_most(("events",), body.events, limits.max_events)
    else:
        checks.at_most(("history",), body.history, limits.max_history)
        checks.at_most(("impressions",), body.impressions, limits.max_events)
        checks.unique(("impressions",), [impression.item_id for impression in body.impressions])
    checks.raise_any()
    return body


async def checked_recommend(
    body: Annotated[RecommendRequest, Body(openapi_examples=RECOMMEND_EXAMPLES)],
    settings: Settings,
) -> RecommendRequest:
    """The POST /recommend body with its limits checked."""
    limits, checks = settings.limits, _Checks()
    checks.at_most(("history",), body.history, limits.max_history)
    if isinstance(body, NRRecommendRequest):
        checks.at_most(("exclude",), body.exclude, limits.max_exclude)
    else:
        if body.questions is not None:
            checks.at_most(("questions",), body.questions, limits.max_exclude)
        if body.band is not None and body.target is not None:
            checks.conflict(("band",), "give either target or band, not both")
        if body.band is not None and body.band.low > body.band.high:
            checks.conflict(("band",), "band.low must not be above band.high")
    checks.texts(("items",), body.items, limits.max_items_per_request, limits.max_text_chars)
    checks.raise_any()
    return body
