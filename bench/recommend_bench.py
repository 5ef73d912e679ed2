"""In-process latency of POST /recommend's work (no HTTP): the head, the catalog index and the ranking.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/recommend_bench.py --artifacts artifacts --task kt --synthetic 10000
    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/recommend_bench.py --artifacts artifacts --task nr
    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/recommend_bench.py --artifacts artifacts --task nr --synthetic 1000000

Loads the newest exported version of the task, builds its catalog index (service/catalog.py) from the version's
items, or from --synthetic random unit vectors of the model's dimension (then history items are catalog items
too), and times the endpoint's function on random histories (kt: 100 answers, next 10 at target 0.7; nr: 50
clicks, top 10). With an approximate index it also reports recall@10 against the exact scan, and the index's
build time and memory. For kt it times, on the same requests in alternation, the split head (the version's
precomputed question parts, service/kt_scoring.py) and the full head over every candidate (versions exported without
the split), and reports the largest difference of their probabilities. Prints one JSON object.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--task", choices=["kt", "nr"], required=True)
    parser.add_argument("--synthetic", type=int, default=0, help="a random catalog of this many items")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ann-threshold", type=int, default=20_000)
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from gramrec.service.artifact import list_versions
    from gramrec.service.bundle import ModelBundle
    from gramrec.service.catalog import CatalogIndex
    from gramrec.service.registry import ActiveModel
    from gramrec.service.routers.recommend import _news, _questions
    from gramrec.service.schemas import KTRecommendRequest, NRRecommendRequest

    threadpool_limits(1, user_api="blas")
    version = next(m["version"] for m in list_versions(args.artifacts) if m["task"] == args.task)
    bundle = ModelBundle.load(args.artifacts, version)
    rng = np.random.default_rng(0)
    if args.synthetic:
        ids = [f"s{i}" for i in range(args.synthetic)]
        vectors = rng.standard_normal((args.synthetic, bundle.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        meta = [{}] * len(ids)
    else:
        ids, vectors = bundle.item_embeddings()
        meta = bundle.item_metadata() or [{}] * len(ids)
    def build(kt_output) -> tuple[CatalogIndex, float]:
        start = time.perf_counter()
        index = CatalogIndex(
            version,
            args.task,
            bundle.dim,
            max_bytes=1 << 40,
            ann_threshold=args.ann_threshold,
            capacity=len(ids),
            kt_output=kt_output,
        )
        index.upsert(ids, vectors, meta)
        if len(ids) >= args.ann_threshold:
            index._build_ann()
        return index, time.perf_counter() - start

    index, build_s = build(getattr(bundle, "kt_output", None))
    model = ActiveModel(args.task, version, bundle, index)
    full_head = ActiveModel(args.task, version, bundle, build(None)[0]) if index.kt_output is not None else None

    latencies, recalls, full_latencies, differences = [], [], [], []
    for _ in range(args.requests):
        if args.task == "kt":
            history = [
                {"item_id": ids[int(i)], "correct": bool(rng.random() < 0.6)} for i in rng.integers(0, len(ids), 100)
            ]
            body = KTRecommendRequest(task="kt", history=history, k=10, target=0.7)
            begin = time.perf_counter()
            result = _questions(body, model, store=None)  # type: ignore[arg-type]
            latencies.append(time.perf_counter() - begin)
            if full_head is not None:
                begin = time.perf_counter()
                _questions(body, full_head, store=None)  # type: ignore[arg-type]
                full_latencies.append(time.perf_counter() - begin)
                chosen = [item.item_id for item in result.items]
                rows = [index.rows[i] for i in chosen]
                head = bundle.predict_kt(
                    index.vectors([a.item_id for a in body.history])[0],
                    np.array([a.correct for a in body.history]),
                    index.matrix_rows(np.array(rows)),
                )
                got = np.array([item.probability for item in result.items])
                differences.append(float(np.abs(got - head).max()))
        else:
            history = [ids[int(i)] for i in rng.choice(len(ids), 50, replace=False)]
            body = NRRecommendRequest(task="nr", history=history, k=10)
            begin = time.perf_counter()
            result = _news(body, model, store=None)  # type: ignore[arg-type]
            latencies.append(time.perf_counter() - begin)
            if index.approximate:
                rows = index.candidates(exclude=history)
                user = bundle.score_news(index.vectors(history)[0], np.eye(bundle.dim, dtype=np.float32))
                scores = index.matrix_rows(rows) @ user
                exact = {index.ids[r] for r in rows[np.argsort(-scores)[:10]].tolist()}
                recalls.append(len(exact & {item.item_id for item in result.items}) / 10)
    ms = np.array(latencies[10:]) * 1000  # the first few warm caches
    report = {
        "task": args.task,
        "version": version,
        "catalog": len(ids),
        "synthetic": bool(args.synthetic),
        "approximate": index.approximate,
        "index_build_s": round(build_s, 2),
        "index_mb": round(index.nbytes() / 2**20, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "recall_at_10": round(float(np.mean(recalls)), 3) if recalls else None,
        **(
            {
                "full_head_p50_ms": round(float(np.percentile(np.array(full_latencies[10:]) * 1000, 50)), 2),
                "full_head_p99_ms": round(float(np.percentile(np.array(full_latencies[10:]) * 1000, 99)), 2),
                "max_probability_difference_vs_head": max(differences),
            }
            if full_latencies
            else {}
        ),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
