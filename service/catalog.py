"""The catalog index of one model version in one process: every item's vector and metadata, for POST /recommend.

Built from the version's exported table plus the items added through POST /items (read from the store) before
the version is swapped in (service/registry.py), so a request, which takes one ActiveModel, searches exactly the
catalog of its own version. Items added later reach it two ways: the process that served POST /items adds them at
once; every other process reads the store's change log (ids with a sequence number) every `index_refresh_s`.

Search is exact (one matrix-vector product over the [N, D] float32 matrix) up to `index_ann_threshold` items; above
it a 4-bit quantised scan (service/quantized_scan.py, FAISS) picks candidates for unfiltered queries, which are
rescored exactly, and category/freshness filters scan their subset exactly.
Memory (matrix, metadata columns, graph) is bounded by `index_max_bytes`: a version whose catalog does not fit is
not activated, and POST /items that would pass the bound is refused (507) before anything is stored.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from gramrec.service.errors import GramrecError
from gramrec.service.kt_scoring import KTOutputLayer
from gramrec.service.quantized_scan import MIN_ROWS, RESCORE_MIN, QuantizedScan, code_bytes
from gramrec.service.store import Store
from gramrec.service.store.items import decode_rows

log = logging.getLogger("gramrec.service")

READ_CHUNK = 5000  # ids per store read while building


class IndexFull(GramrecError, MemoryError):
    """The catalog would outgrow index_max_bytes (HTTP 507)."""


@dataclass(frozen=True)
class _Columns:
    """One consistent view of the arrays: rows [0, n) are valid. Appends within capacity publish a new view."""

    matrix: np.ndarray  # [capacity, D] float32
    category: np.ndarray  # [capacity] int32 code, -1 = none
    subcategory: np.ndarray  # [capacity] int32 code, -1 = none
    published: np.ndarray  # [capacity] float64 Unix seconds, NaN = unknown
    terms: np.ndarray  # [capacity, H] float32: kt question parts (service/kt_scoring.py); [capacity, 0] without
    n: int


def _timestamp(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return math.nan
    return math.nan


class CatalogIndex:
    def __init__(
        self,
        version: str,
        task: str,
        dim: int,
        *,
        max_bytes: int,
        ann_threshold: int,
        capacity: int = 1024,
        kt_output: KTOutputLayer | None = None,
    ):
        self.version, self.task, self.dim = version, task, dim
        self.kt_output = kt_output  # set: each item's kt question part is kept beside its vector
        self.max_bytes = max_bytes
        self.ann_threshold = ann_threshold
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.seq = 0  # the store change log's sequence number up to which this index is current
        self.pending: set[str] = set()  # in the change log but not yet in this version's table
        self.replaced = 0  # upserts that replaced an indexed item's vector (the kt state cache is cleared on change)
        self._codes: dict[str, dict[str, int]] = {"category": {}, "subcategory": {}}
        self._names: dict[str, list[str]] = {"category": [], "subcategory": []}
        self._lock = threading.Lock()
        self._ann: QuantizedScan | None = None  # codes of rows [0, len(self._ann))
        self._cols = self._allocate(max(capacity, 1), None)

    # -- building -----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, store: Store, bundle, *, max_bytes: int, ann_threshold: int) -> CatalogIndex:
        """The version's whole catalog: its exported items, then the API-added items of the store (their vectors
        from this version's table, their metadata from the task's metadata hash)."""
        seq, added = store.item_changes(bundle.task, 0)  # read first: anything changed later is caught up
        ids, vectors = bundle.item_embeddings()
        base_meta = bundle.item_metadata() or [{}] * len(ids)
        index = cls(
            bundle.version,
            bundle.task,
            bundle.dim,
            max_bytes=max_bytes,
            ann_threshold=ann_threshold,
            capacity=len(ids) + len(added) + 1024,
            kt_output=getattr(bundle, "kt_output", None),
        )
        index.upsert(ids, vectors, base_meta)
        index._apply(store, added)
        index.seq = seq
        if len(index.ids) >= max(ann_threshold, MIN_ROWS):
            index._build_ann()
        return index

    def catch_up(self, store: Store) -> int:
        """Applies the store's changes since the last call; returns how many items changed."""
        seq, changed = store.item_changes(self.task, self.seq)
        todo = list(dict.fromkeys([*self.pending, *changed]))
        if not todo:
            return 0
        self._apply(store, todo)
        self.seq = seq
        return len(todo)

    def _apply(self, store: Store, ids: Sequence[str]) -> None:
        ids = list(ids)
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            matrix, missing = decode_rows(store.get_vectors(self.version, chunk), self.dim)
            meta = store.item_metadata(self.task, chunk)
            absent = set(missing)
            present = [i for i in range(len(chunk)) if i not in absent]
            self.pending.difference_update(chunk)
            self.pending.update(chunk[i] for i in missing)  # backfilled at activation: read again next time
            if present:
                self.upsert([chunk[i] for i in present], matrix[present], [meta.get(chunk[i], {}) for i in present])

    # -- memory ---------------------------------------------------------------------------------------------------
    def _terms_dim(self) -> int:
        return self.kt_output.hidden if self.kt_output is not None else 0

    def _row_bytes(self) -> int:
        return 4 * self.dim + 4 + 4 + 8 + 4 * self._terms_dim()

    def _ann_row_bytes(self) -> int:
        return code_bytes(self.dim)

    def nbytes(self) -> int:
        cols = self._cols
        ann = self._ann.nbytes() if self._ann is not None else 0
        columns = cols.matrix.nbytes + cols.category.nbytes + cols.subcategory.nbytes + cols.published.nbytes
        return columns + cols.terms.nbytes + ann

    def check_room(self, new_items: int) -> None:
        """Raises IndexFull if `new_items` more items would pass max_bytes (nothing is changed)."""
        n = len(self.ids) + new_items
        approximate = self._ann is not None or n >= max(self.ann_threshold, MIN_ROWS)
        need = n * self._row_bytes() + (n * self._ann_row_bytes() if approximate else 0)
        if need > self.max_bytes:
            raise IndexFull(
                f"the {self.task} catalog index would need {need} bytes for {n} items, over index_max_bytes="
                f"{self.max_bytes}"
            )

    def new_ids(self, ids: Sequence[str]) -> int:
        return sum(1 for i in set(ids) if i not in self.rows)

    def _allocate(self, capacity: int, old: _Columns | None) -> _Columns:
        cols = _Columns(
            matrix=np.zeros((capacity, self.dim), np.float32),
            category=np.full(capacity, -1, np.int32),
            subcategory=np.full(capacity, -1, np.int32),
            published=np.full(capacity, np.nan, np.float64),
            terms=np.zeros((capacity, self._terms_dim()), np.float32),
            n=old.n if old is not None else 0,
        )
        if old is not None:
            for name in ("matrix", "category", "subcategory", "published", "terms"):
                getattr(cols, name)[: old.n] = getattr(old, name)[: old.n]
        return cols

    # -- writing --------------------------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict]) -> None:
        vectors = np.asarray(vectors, np.float32).reshape(len(ids), self.dim)
        with self._lock:
            self.check_room(self.new_ids(ids))
            cols = self._cols
            n = cols.n
            unique = dict.fromkeys(ids)
            new = [i for i in unique if i not in self.rows]
            self.replaced += len(new) < len(unique)
            if n + len(new) > cols.matrix.shape[0]:
                capacity = max(n + len(new), int(cols.matrix.shape[0] * 1.5) + 1024)
                cols = self._allocate(capacity, cols)
            for item_id in new:
                self.rows[item_id] = n
                self.ids.append(item_id)
                n += 1
            rows = np.fromiter((self.rows[i] for i in ids), np.int64, count=len(ids))
            cols.matrix[rows] = vectors
            cols.category[rows] = [self._code("category", m.get("category")) for m in metadata]
            cols.subcategory[rows] = [self._code("subcategory", m.get("subcategory")) for m in metadata]
            cols.published[rows] = [_timestamp(m.get("published_at")) for m in metadata]
            if self.kt_output is not None:
                cols.terms[rows] = self.kt_output.item_terms(vectors)
            self._cols = _Columns(cols.matrix, cols.category, cols.subcategory, cols.published, cols.terms, n)
            if self._ann is not None:
                self._ann_update(rows, self._cols)

    def _code(self, field: str, value: object) -> int:
        if not isinstance(value, str) or not value:
            return -1
        codes = self._codes[field]
        if value not in codes:
            codes[value] = len(codes)
            self._names[field].append(value)
        return codes[value]

    # -- approximate index ----------------------------------------------------------------------------------------
    def _build_ann(self) -> None:
        cols = self._cols
        self._ann = QuantizedScan(cols.matrix[: cols.n])

    def _ann_update(self, rows: np.ndarray, cols: _Columns) -> None:
        """Encodes the appended rows and marks the replaced ones stale (called under the write lock)."""
        ann = self._ann
        assert ann is not None
        coded = len(ann)
        if cols.n > coded:
            ann.add(cols.matrix[coded : cols.n])
        replaced = rows[rows < coded]
        if len(replaced):
            ann.mark_stale(replaced, cols.matrix[: cols.n])

    @property
    def approximate(self) -> bool:
        return self._ann is not None

    # -- reading --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._cols.n

    def vectors(self, ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """([n, D] rows of the ids that are in the index, zero rows for those that are not; their positions)."""
        cols = self._cols
        rows = [self.rows.get(i, -1) for i in ids]
        missing = [n for n, r in enumerate(rows) if r < 0 or r >= cols.n]
        out = cols.matrix[[max(r, 0) for r in rows]]
        if missing:
            out[missing] = 0.0
        return out, missing

    def matrix_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._cols.matrix[rows]

    def kt_terms(self, rows: np.ndarray | None) -> np.ndarray:
        """kt question parts [len(rows), H] of the rows (None: every row); needs an index built with kt_output."""
        cols = self._cols
        return cols.terms[: cols.n] if rows is None else cols.terms[rows]

    def candidates(
        self,
        *,
        exclude: Sequence[str] = (),
        only: Sequence[str] | None = None,
        category: str | None = None,
        subcategory: str | None = None,
        published_after: float | None = None,
    ) -> np.ndarray | None:
        """Rows passing the filters (None: every row, no filter)."""
        cols = self._cols
        n = cols.n
        mask: np.ndarray | None = None

        def narrow(condition: np.ndarray) -> None:
            nonlocal mask
            mask = condition if mask is None else mask & condition

        if only is not None:
            keep = np.zeros(n, np.bool_)
            keep[[r for r in (self.rows.get(i, -1) for i in only) if 0 <= r < n]] = True
            narrow(keep)
        for field, value, column in (
            ("category", category, cols.category),
            ("subcategory", subcategory, cols.subcategory),
        ):
            if value is not None:
                code = self._codes[field].get(value)
                narrow(column[:n] == code if code is not None else np.zeros(n, np.bool_))
        if published_after is not None:
            narrow(cols.published[:n] > published_after)  # NaN (unknown) compares False
        if mask is None:
            if not exclude:
                return None
            mask = np.ones(n, np.bool_)
        drop = [r for r in (self.rows.get(i, -1) for i in exclude) if 0 <= r < n]
        mask[drop] = False
        return np.flatnonzero(mask)

    def top_k(
        self, query: np.ndarray, k: int, rows: np.ndarray | None, excluded: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k rows of highest dot product with `query` among `rows` (None: every row), never one of the `excluded`
        ids -> (rows, scores), best first.

        Searches over every row (rows is None) take their candidates from the quantised scan when there is one; the
        exclusions are applied to its few hundred candidates, so an unfiltered request builds no [N] mask. Every
        returned score is exact.
        """
        cols = self._cols
        query = np.ascontiguousarray(query, np.float32)
        drop = np.fromiter({r for r in (self.rows.get(i, -1) for i in excluded) if 0 <= r < cols.n}, np.int64, count=-1)
        if self._ann is not None and rows is None:
            rows = self._ann_candidates(query, k, drop, cols.n)  # None: too few left, scan every row
        if rows is None:
            scores = cols.matrix[: cols.n] @ query
            rows = np.arange(cols.n)
        else:
            scores = cols.matrix[rows] @ query
        if len(drop):
            keep = ~np.isin(rows, drop)
            rows, scores = rows[keep], scores[keep]
        if len(rows) > k:
            best = np.argpartition(-scores, k - 1)[:k]
        else:
            best = np.arange(len(rows))
        best = best[np.lexsort((rows[best], -scores[best]))]  # score, then row: a deterministic order
        return rows[best], scores[best]

    def _ann_candidates(self, query: np.ndarray, k: int, drop: np.ndarray, n: int) -> np.ndarray | None:
        """The quantised scan's candidate rows, without the dropped ones; None when fewer than k are left."""
        ann = self._ann
        assert ann is not None
        found = ann.candidates(query, max(RESCORE_MIN, 3 * k) + len(drop))
        rows = found[(found < n) & ~np.isin(found, drop)]
        return rows if len(rows) >= min(k, n - len(drop)) else None

    def metadata(self, row: int) -> dict:
        cols = self._cols
        out: dict = {}
        for field, column in (("category", cols.category), ("subcategory", cols.subcategory)):
            code = int(column[row])
            if code >= 0:
                out[field] = self._names[field][code]
        published = float(cols.published[row])
        if not math.isnan(published):
            out["published_at"] = published
        return out
