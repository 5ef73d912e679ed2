"""POST /recommend: the top news of the whole catalog (nr), the next questions at the right difficulty (kt).

One ActiveModel per request: its bundle scores and its catalog index (service/catalog.py) lists the items, both of
the same version, which the response names. A plain `def` endpoint (threadpool), as /predict.
"""

from __future__ import annotations

from datetime import UTC
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends

from gramrec.service.catalog import CatalogIndex
from gramrec.service.deps import Served, get_store, served
from gramrec.service.inference import kt_history_state, request_vectors
from gramrec.service.limits import checked_recommend
from gramrec.service.registry import ActiveModel
from gramrec.service.responses import ModelJSONResponse
from gramrec.service.schemas import (
    KTRecommendRequest,
    KTRecommendResponse,
    NRRecommendRequest,
    NRRecommendResponse,
    RecommendedNews,
    RecommendedQuestion,
)
from gramrec.service.store import Store, StoreError

router = APIRouter(tags=["recommend"])

DEFAULT_TARGET = 0.7

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"description": "invalid request, over a limit, or unknown history items (listed in detail.unknown_items)"},
    503: {"description": "no model loaded for the task, or the item store is unavailable"},
}


@router.post("/recommend", responses=_ERRORS, response_model=KTRecommendResponse | NRRecommendResponse)
def recommend(
    served_request: Annotated[Served, Depends(served(checked_recommend))],  # the body; its task's model, to the end
    store: Annotated[Store, Depends(get_store)],
) -> ModelJSONResponse:
    body, model = served_request.body, served_request.model
    if model.index is None:
        raise StoreError(f"the catalog index of {model.version} is not built yet")
    if isinstance(body, KTRecommendRequest):
        return ModelJSONResponse(_questions(body, model, store))
    return ModelJSONResponse(_news(body, model, store))


def _news(body: NRRecommendRequest, model: ActiveModel, store: Store) -> NRRecommendResponse:
    index = model.index
    assert index is not None
    history = request_vectors(model, store, body.history, body.items)
    # /predict's score is user · candidate (NRMS): the head scoring the D unit vectors gives the user vector itself.
    user = model.bundle.score_news(history, np.eye(model.bundle.dim, dtype=np.float32))
    published_after = None
    if body.published_after is not None:
        moment = body.published_after
        published_after = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    excluded = list(dict.fromkeys(body.history + body.exclude))
    filtered = body.category is not None or body.subcategory is not None or published_after is not None
    rows = None  # every row but the excluded: the approximate index's search, with no [N] mask
    if filtered:
        rows = index.candidates(
            exclude=excluded, category=body.category, subcategory=body.subcategory, published_after=published_after
        )
    approximate = index.approximate and not filtered
    top, scores = index.top_k(user, body.k, rows, excluded)
    items = []
    for row, score in zip(top.tolist(), scores.tolist(), strict=True):
        items.append(RecommendedNews(item_id=index.ids[row], score=score, **index.metadata(row)))
    return NRRecommendResponse(model_version=model.version, items=items, approximate=approximate)


def _questions(body: KTRecommendRequest, model: ActiveModel, store: Store) -> KTRecommendResponse:
    index = model.index
    assert index is not None
    answered = [answer.item_id for answer in body.history]
    history = request_vectors(model, store, answered, body.items)
    correct = np.fromiter((answer.correct for answer in body.history), dtype=np.int64, count=len(body.history))
    rows = index.candidates(exclude=list(dict.fromkeys(answered)), only=body.questions)
    if index.kt_output is not None:  # the LSTM once, then one [N, H] product over precomputed question parts
        state = kt_history_state(model, answered, history, correct, body.items)
        rows, probabilities = _split_head_probabilities(index, state, rows)
    else:  # a version exported without its split head: the head scores every candidate
        if rows is None:
            rows = np.arange(len(index))
        probabilities = np.asarray(model.bundle.predict_kt(history, correct, index.matrix_rows(rows)), np.float64)
    if body.band is not None:
        inside = (probabilities >= body.band.low) & (probabilities <= body.band.high)
        rows, probabilities = rows[inside], probabilities[inside]
        goal = (body.band.low + body.band.high) / 2
    else:
        goal = body.target if body.target is not None else DEFAULT_TARGET
    order = _closest_first(rows, np.abs(probabilities - goal), body.k)
    return KTRecommendResponse(
        model_version=model.version,
        items=[
            RecommendedQuestion(item_id=index.ids[int(rows[i])], probability=float(probabilities[i])) for i in order
        ],
    )


def _split_head_probabilities(
    index: CatalogIndex, state: np.ndarray, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, P(correct) of each): over every row when most are wanted (a view, no [N, H] gather), else the subset."""
    assert index.kt_output is not None
    if rows is not None and 2 * len(rows) < len(index):
        return rows, np.asarray(index.kt_output.probabilities(state, index.kt_terms(rows)), np.float64)
    every = np.asarray(index.kt_output.probabilities(state, index.kt_terms(None)), np.float64)
    if rows is None:
        return np.arange(len(every)), every
    return rows, every[rows]


def _closest_first(rows: np.ndarray, distance: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest distances, closest first, ties by catalog row; sorts only the nearest few."""
    kth = np.partition(distance, k - 1)[k - 1] if len(distance) > k else np.nan
    if not np.isnan(kth):  # (NaN: fewer than k finite distances; the full sort below puts NaN last)
        near = np.flatnonzero(distance <= kth)  # every tie of the k-th too, so the tie order stays the catalog's
        return near[np.lexsort((rows[near], distance[near]))][:k]
    return np.lexsort((rows, distance))[:k]
