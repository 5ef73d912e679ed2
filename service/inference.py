"""A request's item vectors: one read from the active table (or the version's catalog index), unknown items encoded
from request texts. Shared by /predict and /recommend."""

from __future__ import annotations

import numpy as np

from gramrec.service.errors import UnknownItems
from gramrec.service.registry import ActiveModel
from gramrec.service.schemas import ItemText
from gramrec.service.store import Store, StoreError
from gramrec.service.store.items import decode_rows


def item_vectors(
    model: ActiveModel, store: Store, ids: list[str], items: list[ItemText]
) -> tuple[np.ndarray, dict[str, int]]:
    """Vectors of the distinct `ids` (one store round trip) -> ([n, D] float32, row of each id).

    An id absent from the table is encoded from its text in `items` for this request only (never stored);
    without a text, or with a model that has no encoder, the request fails naming every such id.
    """
    unique = list(dict.fromkeys(ids))
    texts = {item.item_id: item.text for item in items}
    matrix, missing = decode_rows(store.get_vectors(model.version, unique), model.bundle.dim)
    if len(missing) == len(unique) and any(unique[i] not in texts for i in missing):
        # Not the caller's fault if the store lost the table (Redis restarted empty): a 422 "unknown items" would
        # tell clients their ids are wrong; this is a 503 until the model poll reloads the table. (Ids that all
        # came with texts are encoded instead: the answer needs no table, so no check.)
        if not store.has_table(model.version):
            raise StoreError(f"the item table of {model.version} is missing from the store")
        # It may have been reloaded between the two reads: read once more before calling the ids unknown.
        matrix, missing = decode_rows(store.get_vectors(model.version, unique), model.bundle.dim)
    if missing:
        missing_ids = [unique[i] for i in missing]
        unknown = [item_id for item_id in missing_ids if item_id not in texts]
        if unknown:
            raise UnknownItems(unknown)
        if not model.bundle.has_encoder:
            raise UnknownItems(missing_ids, reason=f"model {model.version} has no content encoder to encode texts")
        matrix = matrix.copy()  # frombuffer gives a read-only view
        matrix[missing] = model.bundle.encode_texts([texts[item_id] for item_id in missing_ids])
    return matrix, {item_id: row for row, item_id in enumerate(unique)}


def request_vectors(model: ActiveModel, store: Store, ids: list[str], items: list[ItemText]) -> np.ndarray:
    """[len(ids), D] in order (ids may repeat): from the version's in-process catalog index, else (no index, an item
    added a moment ago through another worker, or given as text in `items`) as `item_vectors` reads them.

    The index first because it costs no store round trip: a kt request's 105 ids are ~80 KB of vectors from Redis,
    0.1-0.2 ms of the worker's CPU (BENCHMARKS.md §2). A vector replaced through another worker reaches the index
    within index_refresh_s, as it reaches /recommend."""
    if model.index is None:
        found, row = item_vectors(model, store, ids, items)
        return found[[row[i] for i in ids]]
    vectors, missing = model.index.vectors(ids)
    if missing:
        found, row = item_vectors(model, store, [ids[i] for i in missing], items)  # UnknownItems: a 422
        vectors[missing] = found[[row[ids[i]] for i in missing]]
    return vectors


def kt_history_state(
    model: ActiveModel, ids: list[str], history: np.ndarray, correct: np.ndarray, items: list[ItemText]
) -> np.ndarray:
    """The LSTM state [H] after a kt history, from the worker's per-student cache when the version has one.

    A request with item texts skips the cache: its unknown items are encoded for that request only, so the same ids
    may mean other vectors in another request."""
    cache = model.kt_cache
    if cache is None or items:
        return model.bundle.kt_state(history, correct)
    if model.index is not None:
        cache.invalidate_on(model.index.replaced)
    return cache.state(model.bundle, ids, history, correct)
