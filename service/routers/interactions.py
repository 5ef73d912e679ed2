"""POST /interactions: answers (kt) and news impressions (nr), appended to a durable log that retraining reads.

Entries are flat string fields: kt one entry per answer (user_id, item_id, correct 0/1, timestamp);
nr one entry per impression list, in MIND's own format (history "N1 N2", impressions "N3-1 N4-0").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, status

from gramrec.service.deps import get_store
from gramrec.service.limits import checked_interactions
from gramrec.service.schemas import Interactions, InteractionsResponse, KTInteractions
from gramrec.service.store import Store

router = APIRouter(tags=["interactions"])


def _iso(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


@router.post("/interactions", status_code=status.HTTP_201_CREATED)
def log_interactions(
    body: Annotated[Interactions, Depends(checked_interactions)],
    store: Annotated[Store, Depends(get_store)],
) -> InteractionsResponse:
    if isinstance(body, KTInteractions):
        records = [
            {
                "user_id": body.user_id,
                "item_id": e.item_id,
                "correct": str(int(e.correct)),
                "timestamp": _iso(e.timestamp),
            }
            for e in body.events
        ]
    else:
        records = [
            {
                "user_id": body.user_id,
                "history": " ".join(body.history),
                "impressions": " ".join(f"{i.item_id}-{int(i.clicked)}" for i in body.impressions),
                "timestamp": _iso(body.timestamp),
            }
        ]
    return InteractionsResponse(ids=store.log_interactions(body.task, records))
