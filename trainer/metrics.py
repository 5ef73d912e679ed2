"""Evaluation metrics in plain numpy, so the product does not depend on scikit-learn.

News metrics follow the MIND leaderboard / microsoft-recommenders definitions so numbers are
comparable with published results.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _as_pair(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D equal-length 0/1 labels and finite scores."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("no labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(np.int64), s


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ascending ranks, tied scores sharing the mean of their ranks."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    group_end = np.cumsum(counts)  # rank of the last member of each tie group
    return (group_end - (counts - 1) / 2.0)[inverse]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank statistic; ties count as half a correct ordering."""
    y, s = _as_pair(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is undefined when labels contain only one class")
    rank_sum = _average_ranks(s)[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _descending(scores: np.ndarray) -> np.ndarray:
    """Order by descending score; ties keep input order so results are deterministic."""
    return np.argsort(-scores, kind="stable")


def mrr(labels: np.ndarray, scores: np.ndarray) -> float:
    """MIND MRR: sum over clicked items of 1/rank, divided by the number of clicks."""
    y, s = _as_pair(labels, scores)
    n_pos = y.sum()
    if n_pos == 0:
        raise ValueError("MRR is undefined without positive labels")
    ranked = y[_descending(s)]
    return float((ranked / np.arange(1, ranked.size + 1)).sum() / n_pos)


def _dcg(ranked_labels: np.ndarray, k: int) -> float:
    top = ranked_labels[:k]
    gains = np.power(2.0, top) - 1.0
    return float((gains / np.log2(np.arange(2, top.size + 2))).sum())


def ndcg_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """nDCG@k with gains 2^rel - 1 and discount log2(rank + 1), normalised by the ideal ordering."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y, s = _as_pair(labels, scores)
    ideal = _dcg(np.sort(y)[::-1], k)
    if ideal == 0.0:
        raise ValueError("nDCG is undefined without positive labels")
    return _dcg(y[_descending(s)], k) / ideal


def news_metrics(groups: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Average per-impression AUC, MRR, nDCG@5 and nDCG@10 over (labels, scores) groups.

    Impressions whose labels are all one class are skipped (AUC is undefined there), as in the MIND
    evaluation; metric values are None when no impression could be used.
    """
    totals = {"auc": 0.0, "mrr": 0.0, "ndcg@5": 0.0, "ndcg@10": 0.0}
    used = skipped = 0
    for labels, scores in groups:
        y, s = _as_pair(labels, scores)
        if y.min() == y.max():
            skipped += 1
            continue
        totals["auc"] += auc(y, s)
        totals["mrr"] += mrr(y, s)
        totals["ndcg@5"] += ndcg_at_k(y, s, 5)
        totals["ndcg@10"] += ndcg_at_k(y, s, 10)
        used += 1
    result: dict = {name: (total / used if used else None) for name, total in totals.items()}
    result.update(impressions=used, skipped=skipped)
    return result


def _auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return auc(labels, scores)


def kt_metrics(labels: np.ndarray, scores: np.ndarray, is_cold: np.ndarray) -> dict:
    """KT AUC/accuracy over all predictions and AUC over predictions on cold-start items.

    ``scores`` are probabilities of a correct answer (accuracy thresholds them at 0.5). An AUC is None
    when its part has a single class or is empty, so small evaluation sets do not crash training.
    """
    y, s = _as_pair(labels, scores)
    cold = np.asarray(is_cold, dtype=bool).ravel()
    if cold.shape != y.shape:
        raise ValueError(f"is_cold has length {cold.shape[0]}, expected {y.shape[0]}")
    return {
        "auc": _auc_or_none(y, s),
        "cold_auc": _auc_or_none(y[cold], s[cold]),
        "acc": float(((s >= 0.5).astype(np.int64) == y).mean()),
        "n": int(y.size),
        "n_cold": int(cold.sum()),
    }


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 20) -> list[dict]:
    """The populated ones of `bins` equal-width bins of [0, 1]: edges, count, mean predicted, observed rate."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _as_pair(labels, probabilities)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append(
                {
                    "bin": [float(edges[b]), float(edges[b + 1])],
                    "n": int(mask.sum()),
                    "mean_predicted": float(p[mask].mean()),
                    "observed": float(y[mask].mean()),
                }
            )
    return out


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 20) -> float:
    """ECE: |mean predicted - observed rate| per equal-width bin, weighted by the bin's share of the answers."""
    n = np.asarray(labels).size
    gaps = (
        b["n"] / n * abs(b["mean_predicted"] - b["observed"]) for b in reliability_bins(labels, probabilities, bins)
    )
    return float(sum(gaps))
