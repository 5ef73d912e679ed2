"""POST /predict: knowledge tracing (kt) and news recommendation (nr), told apart by the body's `task`.

A plain `def` endpoint: FastAPI runs it in its threadpool, so a store read (ids outside the worker's catalog index)
and ONNX Runtime (CPU-bound, releasing the GIL) never block the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends

from gramrec.service.deps import Served, get_store, served
from gramrec.service.inference import kt_history_state, request_vectors
from gramrec.service.limits import checked_predict
from gramrec.service.registry import ActiveModel
from gramrec.service.responses import ModelJSONResponse
from gramrec.service.schemas import (
    KTPredictRequest,
    KTPredictResponse,
    NRPredictRequest,
    NRPredictResponse,
    Prediction,
    Score,
)
from gramrec.service.store import Store

router = APIRouter(tags=["predict"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"description": "invalid request, over a limit, or unknown items (listed in detail.unknown_items)"},
    503: {"description": "no model loaded for the task, or the item store is unavailable"},
}


@router.post("/predict", responses=_ERRORS, response_model=KTPredictResponse | NRPredictResponse)
def predict(
    served_request: Annotated[Served, Depends(served(checked_predict))],  # the body; its task's model, to the end
    store: Annotated[Store, Depends(get_store)],
) -> ModelJSONResponse:
    body, model = served_request.body, served_request.model
    if isinstance(body, KTPredictRequest):
        return ModelJSONResponse(_knowledge_tracing(body, model, store))
    return ModelJSONResponse(_news(body, model, store))


def _knowledge_tracing(body: KTPredictRequest, model: ActiveModel, store: Store) -> KTPredictResponse:
    history_ids = [answer.item_id for answer in body.history]
    vectors = request_vectors(model, store, history_ids + body.targets, body.items)
    history, targets = vectors[: len(history_ids)], vectors[len(history_ids) :]
    correct = np.fromiter((answer.correct for answer in body.history), dtype=np.int64, count=len(body.history))
    output = model.index.kt_output if model.index is not None else None
    if model.kt_cache is not None and output is not None and not body.items:  # the student's state, then the split head
        state = kt_history_state(model, history_ids, history, correct, body.items)
        probabilities = output.probabilities(state, output.item_terms(targets))
    else:
        probabilities = model.bundle.predict_kt(history, correct, targets)
    return KTPredictResponse(
        model_version=model.version,
        predictions=[
            Prediction(item_id=item_id, probability=float(p))
            for item_id, p in zip(body.targets, probabilities, strict=True)
        ],
    )


def _news(body: NRPredictRequest, model: ActiveModel, store: Store) -> NRPredictResponse:
    vectors = request_vectors(model, store, body.history + body.candidates, body.items)
    scores = model.bundle.score_news(vectors[: len(body.history)], vectors[len(body.history) :])
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return NRPredictResponse(
        model_version=model.version,
        scores=[Score(item_id=item_id, score=float(s)) for item_id, s in zip(body.candidates, scores, strict=True)],
        ranking=[body.candidates[i] for i in order],
    )
