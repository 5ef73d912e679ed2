"""service/catalog.py on its own: exact and approximate top-k, filters, growth, the memory bound, catch-up."""

from __future__ import annotations

import numpy as np
import pytest

from gramrec.service.catalog import CatalogIndex, IndexFull
from gramrec.service.store.redis_store import RedisStore
from tests.helpers.fakes import REDIS_URL, FakeBundle, drop_prefix, redis_client

D = 16


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n // 50, 4), D)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.8 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(n: int, ann_threshold: int = 10**9, max_bytes: int = 1 << 30) -> tuple[CatalogIndex, np.ndarray]:
    index = CatalogIndex("nr-v1", "nr", D, max_bytes=max_bytes, ann_threshold=ann_threshold, capacity=8)
    vectors = clustered(n)
    index.upsert([f"i{i}" for i in range(n)], vectors, [{"category": f"c{i % 3}"} for i in range(n)])
    return index, vectors


def test_exact_top_k_is_the_brute_force_order():
    index, vectors = make(500)  # capacity 8: grows several times on the way
    query = vectors[:3].mean(0)
    rows, scores = index.top_k(query, 10, None, ())
    expected = np.argsort(-(vectors @ query), kind="stable")[:10]
    assert rows.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, (vectors @ query)[expected], rtol=1e-6)


def test_filters_and_exclusions():
    index, vectors = make(300)
    query = vectors[0]
    rows = index.candidates(exclude=["i0", "i3", "absent"], category="c0")
    assert set(rows.tolist()) == {i for i in range(300) if i % 3 == 0} - {0, 3}
    top, _ = index.top_k(query, 5, rows, ())
    assert all(r % 3 == 0 and r not in (0, 3) for r in top.tolist())
    assert index.candidates(category="nope").tolist() == []
    assert index.candidates() is None
    assert index.metadata(4) == {"category": "c1"}


def test_approximate_index_recall_and_exclusions():
    index, vectors = make(5000, ann_threshold=1)
    index._build_ann()
    assert index.approximate
    rng = np.random.default_rng(1)
    recalls = []
    for _ in range(50):
        query = vectors[rng.integers(0, 5000, 5)].mean(0)
        exclude = [f"i{i}" for i in rng.integers(0, 5000, 5)]
        rows, scores = index.top_k(query, 10, index.candidates(exclude=exclude), exclude)
        assert not set(rows.tolist()) & {int(e[1:]) for e in exclude}
        assert np.all(np.diff(scores) <= 0)  # best first, exact scores
        scored = vectors @ query
        scored[[int(e[1:]) for e in exclude]] = -np.inf
        truth = set(np.argsort(-scored)[:10].tolist())
        recalls.append(len(truth & set(rows.tolist())) / 10)
    assert np.mean(recalls) >= 0.95


def test_approximate_index_sees_items_added_after_it_was_built():
    index, vectors = make(2000, ann_threshold=1)
    index._build_ann()
    newcomer = vectors[7] * 0.999 + 0.001
    index.upsert(["new"], newcomer[None], [{}])
    rows, _ = index.top_k(newcomer / np.linalg.norm(newcomer), 2, None, ())
    assert index.rows["new"] in rows.tolist()
    moved = vectors[1500]  # an update moves an item in the graph too
    index.upsert(["i3"], moved[None], [{}])
    rows, _ = index.top_k(moved, 3, None, ())
    assert {3, 1500} <= set(rows.tolist())


def test_memory_bound_refuses_growth_and_changes_nothing():
    index, _ = make(100, max_bytes=100 * (4 * D + 16) + 1)
    with pytest.raises(IndexFull):
        index.upsert(["extra"], np.ones((1, D), np.float32), [{}])
    assert len(index) == 100 and "extra" not in index.rows
    index.upsert(["i5"], np.ones((1, D), np.float32), [{"category": "z"}])  # an update needs no room
    assert index.metadata(5) == {"category": "z"}


def test_build_and_catch_up_from_redis():
    client = redis_client()
    prefix = "gramrec-test-catalog:"
    drop_prefix(client, prefix)
    store = RedisStore.from_url(REDIS_URL, prefix)
    try:
        bundle = FakeBundle("nr-v1", "nr", n_items=10, dim=D)
        ids, vectors = bundle.item_embeddings()
        store.load_table("nr-v1", ids, vectors, D)
        assert store.compare_and_set_active("nr", None, "nr-v1")
        store.put_items("nr", "nr-v1", ["a1"], ["text a1"], np.ones((1, D)), D, [{"category": "x"}])
        index = CatalogIndex.build(store, bundle, max_bytes=1 << 30, ann_threshold=10**9)
        assert len(index) == 11 and index.metadata(index.rows["a1"]) == {"category": "x"}
        assert index.metadata(0) == {"category": "sports", "subcategory": "sub0"}
        assert index.catch_up(store) == 0
        store.put_items("nr", "nr-v1", ["a2", "a1"], ["t2", "t1"], np.ones((2, D)), D, [{}, {"category": "y"}])
        assert index.catch_up(store) == 2
        assert len(index) == 12 and index.metadata(index.rows["a1"]) == {"category": "y"}
        assert index.catch_up(store) == 0
    finally:
        drop_prefix(client, prefix)
        store.close()


def test_approximate_index_recall_does_not_depend_on_clustering():
    """Random directions (a graph index's worst case: recall 0.41 at 51k) are found as well as clustered ones."""
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((8000, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = CatalogIndex("nr-v1", "nr", D, max_bytes=1 << 30, ann_threshold=1, capacity=8)
    index.upsert([f"i{i}" for i in range(8000)], vectors, [{}] * 8000)
    index._build_ann()
    recalls = []
    for _ in range(40):
        query = vectors[rng.integers(0, 8000, 50)].mean(0)
        rows, _ = index.top_k(query, 10, None, ())
        recalls.append(len(set(np.argsort(-(vectors @ query))[:10].tolist()) & set(rows.tolist())) / 10)
    assert np.mean(recalls) >= 0.95


def test_many_replaced_vectors_are_re_encoded_and_still_found():
    index, vectors = make(2000, ann_threshold=1)
    index._build_ann()
    assert index._ann is not None and len(index._ann) == 2000
    rng = np.random.default_rng(3)
    moved = rng.standard_normal((150, D)).astype(np.float32)  # 7.5% of the rows: past the re-encode fraction
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    index.upsert([f"i{i}" for i in range(50)], moved[:50], [{}] * 50)
    assert len(index._ann.stale) == 50  # below the fraction: marked, not yet re-encoded
    index.upsert([f"i{i}" for i in range(50, 150)], moved[50:], [{}] * 100)
    assert index._ann.stale == set() and len(index._ann) == 2000  # re-encoded from the current matrix
    current = vectors.copy()
    current[:150] = moved
    for row in (0, 77, 149):
        rows, scores = index.top_k(moved[row], 1, None, ())
        assert rows.tolist() == [row]
        np.testing.assert_allclose(scores, [current[row] @ moved[row]], rtol=1e-6)


def test_small_catalogs_are_never_approximated():
    index = CatalogIndex("nr-v1", "nr", D, max_bytes=1 << 30, ann_threshold=1, capacity=8)
    index.upsert([f"i{i}" for i in range(100)], clustered(100), [{}] * 100)
    with pytest.raises(ValueError, match="at least 1024 rows"):
        index._build_ann()
    assert not index.approximate


@pytest.mark.parametrize("approximate", [False, True])
def test_exclusions_without_a_candidate_list_match_the_brute_force_order(approximate):
    """An unfiltered request passes rows=None and its exclusions (no [N] mask is built): the excluded never
    come back, and the rest is the exact order."""
    index, vectors = make(3000, ann_threshold=1)
    if approximate:
        index._build_ann()
    query = vectors[:4].mean(0)
    scored = vectors @ query
    best = np.argsort(-scored, kind="stable")
    excluded = [f"i{r}" for r in best[:7].tolist()] + ["absent", "i5"]
    rows, scores = index.top_k(query, 10, None, excluded)
    expected = [r for r in best.tolist() if f"i{r}" not in excluded][:10]
    assert rows.tolist() == expected
    np.testing.assert_allclose(scores, scored[expected], rtol=1e-6)
    everything_but_one = [f"i{r}" for r in range(3000) if r != 42]  # more exclusions than candidates: still exact
    rows, _ = index.top_k(query, 3, None, everything_but_one)
    assert rows.tolist() == [42]


def test_searches_run_safely_while_items_are_appended_and_replaced():
    """FAISS may move its arrays when items are added: searches in other threads (endpoints run in a threadpool)
    must never read them mid-move, and every answer is a valid, exactly scored top k."""
    import threading

    index, vectors = make(3000, ann_threshold=1)
    index._build_ann()
    rng = np.random.default_rng(4)
    extra = rng.standard_normal((1500, D)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    errors: list[BaseException] = []
    done = threading.Event()
    replaced = np.array(sorted({(start * 7) % 3000 for start in range(0, 1500, 25)}))

    def search() -> None:
        local = np.random.default_rng(threading.get_ident() % 2**32)
        try:
            while not done.is_set():
                query = vectors[local.integers(0, 3000, 5)].mean(0)
                rows, scores = index.top_k(query, 10, None, ["i1", "i2"])
                assert len(rows) == 10 and not {1, 2} & set(rows.tolist()) and np.all(np.diff(scores) <= 0)
                steady = ~np.isin(rows, replaced)  # a replaced row may change between top_k and this check
                np.testing.assert_allclose(
                    scores[steady], index.matrix_rows(rows[steady]) @ query, rtol=1e-5, atol=1e-6
                )
        except BaseException as error:  # reported below: an assertion in a thread would be lost
            errors.append(error)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for start in range(0, 1500, 25):  # appends (the arrays grow) and replacements (stale marks, a re-encode)
            index.upsert([f"new{i}" for i in range(start, start + 25)], extra[start : start + 25], [{}] * 25)
            index.upsert([f"i{(start * 7) % 3000}"], extra[start : start + 1], [{}])  # rows in `replaced`
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors[0]
    assert index._ann is not None and len(index._ann) == len(index) == 4500
    rows, _ = index.top_k(extra[1499], 1, None, ())
    assert index.ids[int(rows[0])] == "new1499"
