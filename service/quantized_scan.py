"""The approximate first pass of unfiltered /recommend over large catalogs: a 4-bit product-quantised scan of every
item (FAISS IndexPQFastScan), whose best few hundred candidates the catalog index rescores exactly.

Why a quantised scan and not a graph (BENCHMARKS.md §5): it reads every item, so its recall does not depend on how
the catalog clusters. An HNSW graph (usearch, used before) reached recall@10 0.41 on 51k random vectors and 0.37
on 1M clustered ones at its service setting, and needed a search as slow as the exact scan to pass 0.95. This scan
with 2 dimensions per 4-bit code (96 bytes an item at D = 384) and 300 candidates rescored measured recall@10 0.985
to 1.0 on 51k and 1M items, random and clustered, at p99 under 10 ms for 1M on one core; it trains and encodes 1M
items in about 5 s where the graph took 12 to 26 minutes, in a tenth of the graph's memory.

Rows are the catalog's own: code i is row i. An item appended to the catalog is encoded at once (`add`); an item
whose vector is replaced keeps its old code but is marked stale, and stale rows are always handed to the exact
rescoring, so a replaced vector is never missed. Past STALE_REBUILD_FRACTION of the rows, every code is re-encoded.
"""

from __future__ import annotations

import os

import numpy as np

from gramrec.service.read_write_lock import ReadWriteLock

DIMS_PER_CODE = 2  # dimensions per 4-bit sub-quantiser (M = D / 2); 4 per code measured recall 0.82 at 1M random
RESCORE_MIN = 300  # candidates rescored exactly per search (at least): recall@10 >= 0.985 on every measured catalog
TRAIN_ROWS = 65_536  # codebooks are trained on an even sample of at most this many rows
MIN_ROWS = 1024  # below this an exact scan costs nothing worth approximating, and the codebooks would be poor
STALE_REBUILD_FRACTION = 0.05


def sub_quantizers(dim: int) -> int:
    return dim // DIMS_PER_CODE if dim % DIMS_PER_CODE == 0 else dim


def code_bytes(dim: int) -> int:
    """Bytes of one item's codes (4 bits per sub-quantiser)."""
    return (sub_quantizers(dim) + 1) // 2


class QuantizedScan:
    """Candidate rows for an inner-product query over rows [0, len) of a float32 matrix. Thread-safe: searches run
    together (FAISS releases the GIL: two threads search 1.8x as fast as one), appends and re-encodes alone (FAISS's
    arrays may move on add)."""

    def __init__(self, matrix: np.ndarray) -> None:
        import faiss  # the wheel is large to load: only processes that serve a large catalog pay for it

        self._faiss = faiss
        n, dim = matrix.shape
        if n < MIN_ROWS:
            raise ValueError(f"a quantised scan needs at least {MIN_ROWS} rows, got {n}")
        self.dim = dim
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # training and encoding use every core of this thread's pool
        self._index = faiss.IndexPQFastScan(dim, sub_quantizers(dim), 4, faiss.METRIC_INNER_PRODUCT)
        sample = matrix[np.linspace(0, n - 1, min(n, TRAIN_ROWS)).astype(np.int64)]
        self._index.train(np.ascontiguousarray(sample, np.float32))
        self._index.add(np.ascontiguousarray(matrix, np.float32))
        self.stale: set[int] = set()
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def nbytes(self) -> int:
        codebooks = 16 * self.dim * 4
        return len(self) * code_bytes(self.dim) + codebooks

    def add(self, vectors: np.ndarray) -> None:
        """Encodes rows [len, len + m) (the catalog's appended rows, in order)."""
        with self._lock.writing():
            self._index.add(np.ascontiguousarray(vectors, np.float32))

    def mark_stale(self, rows: np.ndarray, matrix: np.ndarray) -> None:
        """Rows below len whose vectors changed; past the rebuild fraction, `matrix` (every row) is re-encoded."""
        with self._lock.writing():
            self.stale.update(int(r) for r in rows if r < self._index.ntotal)
            if len(self.stale) > STALE_REBUILD_FRACTION * self._index.ntotal:
                self._index.reset()
                self._index.add(np.ascontiguousarray(matrix, np.float32))
                self.stale.clear()

    def candidates(self, query: np.ndarray, want: int) -> np.ndarray:
        """Rows of the `want` best approximate scores, plus every stale row (their exact scores decide)."""
        self._faiss.omp_set_num_threads(1)  # this thread only: one query needs no pool (measured: no faster with 2)
        with self._lock.reading():
            _, found = self._index.search(query.reshape(1, -1), min(want, int(self._index.ntotal)))
            stale = np.fromiter(self.stale, np.int64, count=len(self.stale)) if self.stale else None
        rows = found[0][found[0] >= 0]
        return rows if stale is None else np.union1d(rows, stale)
