"""Recommendation quality on MIND's test day: hit rate@10, @50 and nDCG@10 of the clicked news, against baselines.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/quality_nr.py --artifacts artifacts --data ../shared/data/mind_small_subset

For each test-day impression with a click and a history, the newest exported nr version ranks the pool of news
shown that day (the day's catalog, as POST /recommend would with a freshness filter), leaving out the reader's
history, by the served score (reader vector from the ONNX head, dot product with the exported item table). The
clicked news of the impression are the relevant ones. Baselines on the same pool: most popular (clicks on the
days before the test day; ties by impressions) and random. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ranks_metrics(order: np.ndarray, relevant: set[int]) -> tuple[float, float, float]:
    """order: pool indices best first -> (hit@10, hit@50, nDCG@10)."""
    top10, top50 = order[:10].tolist(), order[:50].tolist()
    hit10 = float(any(i in relevant for i in top10))
    hit50 = float(any(i in relevant for i in top50))
    dcg = sum(1 / np.log2(rank + 2) for rank, i in enumerate(top10) if i in relevant)
    ideal = sum(1 / np.log2(rank + 2) for rank in range(min(10, len(relevant))))
    return hit10, hit50, dcg / ideal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from gramrec.service.artifact import list_versions
    from gramrec.service.bundle import ModelBundle
    from gramrec.trainer.mind_data import load_mind, split_mind

    threadpool_limits(1, user_api="blas")
    version = next(m["version"] for m in list_versions(args.artifacts) if m["task"] == "nr")
    bundle = ModelBundle.load(args.artifacts, version)
    ids, table = bundle.item_embeddings()
    row = {item_id: i for i, item_id in enumerate(ids)}
    data = load_mind(args.data)
    splits = split_mind(data)
    nid = data.items.ids
    before = splits.train + splits.val
    clicks = Counter(nid[c] for imp in before for c, label in zip(imp.candidates, imp.labels, strict=True) if label)
    shown = Counter(nid[c] for imp in before for c in imp.candidates)
    pool_ids = sorted({nid[c] for imp in splits.test for c in imp.candidates} & set(row))
    pool_rows = np.array([row[i] for i in pool_ids])
    pool_matrix = table[pool_rows]
    position = {item_id: n for n, item_id in enumerate(pool_ids)}
    popularity = np.array([clicks[i] + 1e-6 * shown[i] for i in pool_ids])
    popular_order = np.argsort(-popularity, kind="stable")
    rng = np.random.default_rng(0)
    eye = np.eye(bundle.dim, dtype=np.float32)
    results: dict[str, list[tuple[float, float, float]]] = {"model": [], "most popular": [], "random": []}
    for imp in splits.test:
        relevant = {position[nid[c]] for c, label in zip(imp.candidates, imp.labels, strict=True) if label}
        history = [nid[h] for h in imp.history if nid[h] in row]
        if not relevant or not history:
            continue
        excluded = np.array([position[h] for h in history if h in position], dtype=np.int64)
        user = bundle.score_news(table[[row[h] for h in history[-50:]]], eye)
        scores = pool_matrix @ user
        scores[excluded] = -np.inf
        results["model"].append(ranks_metrics(np.argsort(-scores, kind="stable"), relevant))
        keep = ~np.isin(popular_order, excluded)
        results["most popular"].append(ranks_metrics(popular_order[keep], relevant))
        random_order = rng.permutation(len(pool_ids))
        results["random"].append(ranks_metrics(random_order[~np.isin(random_order, excluded)], relevant))
    report = {
        "version": version,
        "test_day_impressions": len(results["model"]),
        "pool": len(pool_ids),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for name, values in results.items():
        array = np.array(values)
        report[name] = {
            "hit@10": round(float(array[:, 0].mean()), 4),
            "hit@50": round(float(array[:, 1].mean()), 4),
            "ndcg@10": round(float(array[:, 2].mean()), 4),
        }
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
