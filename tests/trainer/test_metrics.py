"""Metric correctness: AUC against scikit-learn, ranking metrics against hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gramrec.trainer.metrics import auc, kt_metrics, mrr, ndcg_at_k, news_metrics


@pytest.mark.parametrize("seed", range(200))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1  # both classes present
    # Few distinct values on even seeds -> heavy ties; continuous scores on odd seeds.
    scores = rng.integers(0, 4, n).astype(float) if seed % 2 == 0 else rng.normal(size=n)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_simple_cases() -> None:
    assert auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # all tied


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_auc_raises_on_one_class(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="one class"):
        auc(np.array(labels), np.linspace(0, 1, len(labels)))


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        auc(np.array([0, 1]), np.array([0.1]))
    with pytest.raises(ValueError):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


# Shared hand-worked impression:
#   labels = [0, 1, 0, 1], scores = [0.1, 0.9, 0.8, 0.3]
#   descending score order -> indices 1, 2, 3, 0 -> ranked labels [1, 0, 1, 0]
LABELS = np.array([0, 1, 0, 1])
SCORES = np.array([0.1, 0.9, 0.8, 0.3])


def test_mrr_hand_computed() -> None:
    # clicks at ranks 1 and 3: (1/1 + 1/3) / 2 = 2/3
    assert mrr(LABELS, SCORES) == pytest.approx(2 / 3)
    # single click ranked last of 3: 1/3
    assert mrr(np.array([1, 0, 0]), np.array([0.2, 0.5, 0.9])) == pytest.approx(1 / 3)
    # single click ranked first: 1
    assert mrr(np.array([0, 1]), np.array([0.0, 1.0])) == 1.0


def test_ndcg_hand_computed() -> None:
    # DCG@5  = (2^1-1)/log2(2) + (2^1-1)/log2(4)       = 1 + 0.5          = 1.5
    # IDCG@5 = (2^1-1)/log2(2) + (2^1-1)/log2(3)       = 1 + 0.6309298    = 1.6309298
    assert ndcg_at_k(LABELS, SCORES, 5) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(LABELS, SCORES, 5) == pytest.approx(0.9197207891, abs=1e-9)
    # @1: top item is a click, ideal top is a click -> 1/1 = 1
    assert ndcg_at_k(LABELS, SCORES, 1) == pytest.approx(1.0)
    # @2: DCG = 1 + 0/log2(3) = 1; IDCG = 1 + 1/log2(3) -> 1 / 1.6309298 = 0.6131472
    assert ndcg_at_k(LABELS, SCORES, 2) == pytest.approx(0.6131471928, abs=1e-9)
    # one click ranked 3rd of 3: @2 -> DCG 0 -> 0; @3 -> (1/log2(4)) / (1/log2(2)) = 0.5
    one_click = (np.array([1, 0, 0]), np.array([0.2, 0.5, 0.9]))
    assert ndcg_at_k(*one_click, 2) == 0.0
    assert ndcg_at_k(*one_click, 3) == pytest.approx(0.5)
    # k beyond the list length behaves like k = len
    assert ndcg_at_k(LABELS, SCORES, 10) == ndcg_at_k(LABELS, SCORES, 4)


def test_ranking_metrics_reject_no_click_and_bad_k() -> None:
    with pytest.raises(ValueError):
        mrr(np.array([0, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        ndcg_at_k(np.array([0, 0]), np.array([0.1, 0.2]), 5)
    with pytest.raises(ValueError):
        ndcg_at_k(LABELS, SCORES, 0)


def test_news_metrics_averages_and_skips_single_class() -> None:
    # second impression: labels [1, 0, 0], scores [0.2, 0.5, 0.9] -> auc 0, mrr 1/3, ndcg@5 = 0.5
    groups = [
        (LABELS, SCORES),
        (np.array([1, 0, 0]), np.array([0.2, 0.5, 0.9])),
        (np.array([0, 0, 0]), np.array([0.3, 0.2, 0.1])),  # no click: skipped
        (np.array([1, 1]), np.array([0.3, 0.2])),  # all clicks: skipped
    ]
    result = news_metrics(groups)
    assert result["impressions"] == 2
    assert result["skipped"] == 2
    # first impression AUC: positives {0.9, 0.3} vs negatives {0.8, 0.1}: 3 of 4 pairs ordered -> 0.75
    assert result["auc"] == pytest.approx((0.75 + 0.0) / 2)
    assert result["mrr"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["ndcg@5"] == pytest.approx((0.9197207891 + 0.5) / 2)
    assert result["ndcg@10"] == pytest.approx(result["ndcg@5"])  # lists are shorter than 5


def test_news_metrics_all_skipped() -> None:
    result = news_metrics(iter([(np.array([0, 0]), np.array([0.1, 0.2]))]))
    assert result == {"auc": None, "mrr": None, "ndcg@5": None, "ndcg@10": None, "impressions": 0, "skipped": 1}


def test_kt_metrics() -> None:
    labels = np.array([1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.2, 0.4, 0.6, 0.7, 0.5])
    is_cold = np.array([False, False, False, False, True, True])
    result = kt_metrics(labels, scores, is_cold)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["cold_auc"] is None  # cold part holds only positives
    # predictions >= 0.5: [1, 0, 0, 1, 1, 1] vs labels -> 4 of 6 right
    assert result["acc"] == pytest.approx(4 / 6)
    assert (result["n"], result["n_cold"]) == (6, 2)

    is_cold = np.array([False, False, True, True, True, False])
    cold = kt_metrics(labels, scores, is_cold)
    assert cold["cold_auc"] == pytest.approx(roc_auc_score(labels[is_cold], scores[is_cold]))
    assert kt_metrics(labels, scores, np.zeros(6, dtype=bool))["cold_auc"] is None
