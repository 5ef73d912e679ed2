"""The /recommend catalog index at scale: build time, memory, recall@10 against exact, search latency.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/catalog_scale.py --items 1000000 --vectors clustered random

Builds the service's own `CatalogIndex` (service/catalog.py: an exact float32 matrix, and above the ANN threshold
the 4-bit quantised scan of service/quantized_scan.py, trained and encoded with every core) over synthetic unit
vectors of MiniLM's dimension, then times `top_k` (what POST /recommend nr runs after the head: the quantised scan,
exact rescoring of its candidates, ranking) single-threaded, on queries shaped like a reader vector (the mean of 50
random items). Recall@10 is against an exact scan of the whole matrix.

Two catalogs: `random` (independent Gaussian directions: every item almost equally far from a query, a graph
index's worst case; BENCHMARKS.md §5 measured an HNSW graph's recall 0.41 at 51k) and `clustered` (items around
n/50 topic centres with noise 0.8, as bench/ann_probe.py: text embeddings cluster by topic). --rescore also times
other numbers of rescored candidates than the service's RESCORE_MIN, to show what recall each costs. Prints one JSON
object per catalog.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 384  # all-MiniLM-L6-v2


def synthetic_vectors(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, DIM] float32 unit vectors, generated in chunks to bound the peak memory."""
    out = np.empty((n, DIM), np.float32)
    centres = rng.standard_normal((max(n // 50, 10), DIM), dtype=np.float32) if kind == "clustered" else None
    for lo in range(0, n, 100_000):
        hi = min(lo + 100_000, n)
        if centres is None:
            chunk = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        else:
            chunk = centres[rng.integers(0, len(centres), hi - lo)]
            chunk += rng.standard_normal((hi - lo, DIM), dtype=np.float32) * 0.8
        out[lo:hi] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def measure(kind: str, args, rng: np.random.Generator) -> dict:
    from gramrec.service import catalog
    from gramrec.service.catalog import CatalogIndex
    from gramrec.service.quantized_scan import RESCORE_MIN

    vectors = synthetic_vectors(kind, args.items, rng)
    ids = [f"s{i}" for i in range(args.items)]
    start = time.perf_counter()
    index = CatalogIndex("bench", "nr", DIM, max_bytes=1 << 40, ann_threshold=args.ann_threshold, capacity=args.items)
    index.upsert(ids, vectors, [{}] * len(ids))
    upsert_s = time.perf_counter() - start
    if args.items >= args.ann_threshold:
        index._build_ann()
    build_s = time.perf_counter() - start
    queries = np.stack([vectors[rng.integers(0, args.items, 50)].mean(0) for _ in range(args.queries)])
    exact = [set(np.argpartition(-(vectors @ q), 10)[:10].tolist()) for q in queries]
    report = {
        "catalog": kind,
        "items": args.items,
        "approximate": index.approximate,
        "build_s": round(build_s, 1),
        "of_which_matrix_s": round(upsert_s, 1),
        "index_mb": round(index.nbytes() / 2**20, 1),
        "searches": [],
    }
    rescores = [RESCORE_MIN] + [r for r in args.rescore if r != RESCORE_MIN]
    for rescore in rescores if index.approximate else [None]:
        if rescore is not None:
            catalog.RESCORE_MIN = rescore  # what CatalogIndex._ann_candidates reads
        times, recall = [], []
        for query, truth in zip(queries, exact):
            begin = time.perf_counter()
            rows, _ = index.top_k(query, 10, None, [])
            times.append(time.perf_counter() - begin)
            recall.append(len(truth & set(rows.tolist())) / 10)
        ms = np.array(times[5:]) * 1000
        report["searches"].append({
            "rescored": rescore,
            "service_setting": rescore in (None, RESCORE_MIN),
            "recall_at_10": round(float(np.mean(recall)), 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        })
    begin = time.perf_counter()
    for query in queries[:20]:
        np.argpartition(-(vectors @ query), 10)[:10]
    catalog.RESCORE_MIN = RESCORE_MIN
    report["exact_scan_ms"] = round((time.perf_counter() - begin) / 20 * 1000, 1)
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--vectors", nargs="+", choices=["clustered", "random"], default=["clustered", "random"])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rescore", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--ann-threshold", type=int, default=20_000)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as each service worker runs
    rng = np.random.default_rng(0)
    for kind in args.vectors:
        print(json.dumps(measure(kind, args, rng)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
