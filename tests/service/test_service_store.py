"""The item store, over both backends: real Redis on loopback and the embedded sqlite file."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import redis

from gramrec.service.store.errors import StaleVersion
from gramrec.service.store.items import decode_rows, vector_rows
from gramrec.service.store.redis_store import RedisStore
from gramrec.service.store.sqlite_store import EmbeddedStore
from tests.helpers.fakes import drop_prefix, redis_client

D = 4


@pytest.fixture(params=["redis", "embedded"])
def store(request, tmp_path):
    if request.param == "redis":
        client = redis_client()
        prefix = f"gramrec-test-{uuid.uuid4().hex[:12]}:"
        yield RedisStore(client, prefix)
        drop_prefix(client, prefix)
        client.close()
    else:
        embedded = EmbeddedStore(tmp_path / "store.sqlite3")
        yield embedded
        embedded.close()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_table_round_trip(store):
    ids = [f"i{n}" for n in range(2500)]  # more than one bulk-load chunk
    table = vectors(len(ids))
    assert not store.has_table("kt-v1")
    assert store.load_table("kt-v1", ids, table, D)
    assert store.has_table("kt-v1") and store.count_items("kt-v1") == 2500
    assert not store.load_table("kt-v1", ids, table, D)  # loaded once; a second load is a no-op
    rows = store.get_vectors("kt-v1", ["i7", "nope", "i2499", "i7"])
    matrix, missing = decode_rows(rows, D)
    assert missing == [1]
    np.testing.assert_array_equal(matrix[[0, 2, 3]], table[[7, 2499, 7]])
    assert store.table_ids("kt-v1") == set(ids)


def test_vectors_are_little_endian_float32_bytes(store):
    store.load_table("kt-v1", ["a"], np.array([[1.0, 2.0, 3.0, 4.0]]), D)
    assert store.get_vectors("kt-v1", ["a"])[0] == np.array([1, 2, 3, 4], dtype="<f4").tobytes()


def bad_batch(kind: str) -> np.ndarray:
    """Three rows, the last of them bad (or the whole shape wrong)."""
    batch = vectors(3)
    if kind == "nan":
        batch[2, 1] = np.nan
    elif kind == "inf":
        batch[2, 0] = np.inf
    elif kind == "wrong dim":
        batch = np.zeros((3, D + 1), np.float32)
    else:
        batch = np.zeros(3, np.float32)
    return batch


@pytest.mark.parametrize("kind", ["nan", "inf", "wrong dim", "1-d"])
def test_invalid_vectors_are_refused_before_any_write(store, kind):
    with pytest.raises(ValueError):
        store.load_table("kt-v1", ["a", "b", "c"], bad_batch(kind), D)
    assert not store.has_table("kt-v1")
    store.load_table("kt-v1", ["x"], vectors(1), D)
    store.compare_and_set_active("kt", None, "kt-v1")
    with pytest.raises(ValueError):
        store.put_items("kt", "kt-v1", ["a", "b", "c"], ["ta", "tb", "tc"], bad_batch(kind), D)
    with pytest.raises(ValueError):
        store.add_vectors("kt-v1", ["a", "b", "c"], bad_batch(kind), D)
    assert store.get_vectors("kt-v1", ["a", "b", "c"]) == [None, None, None]  # all or nothing
    assert store.texts("kt") == {}


def test_put_items_writes_vectors_and_texts_together(store):
    store.load_table("kt-v1", ["x"], vectors(1), D)
    assert store.compare_and_set_active("kt", None, "kt-v1")
    new = vectors(2, seed=1)
    store.put_items("kt", "kt-v1", ["a", "b"], ["text a", "text b"], new, D)
    assert store.texts("kt") == {"a": "text a", "b": "text b"}
    text, vector = store.get_item("kt", "kt-v1", "b")
    assert text == "text b" and np.frombuffer(vector, "<f4").tolist() == new[1].tolist()
    assert store.get_item("kt", "kt-v1", "x") == (None, store.get_vectors("kt-v1", ["x"])[0])
    assert store.get_item("kt", "kt-v1", "zzz") == (None, None)


def test_put_items_refuses_a_version_that_is_no_longer_active(store):
    store.load_table("kt-v1", ["x"], vectors(1), D)
    store.load_table("kt-v2", ["x"], vectors(1), D)
    store.compare_and_set_active("kt", None, "kt-v1")
    store.compare_and_set_active("kt", "kt-v1", "kt-v2")
    with pytest.raises(StaleVersion):
        store.put_items("kt", "kt-v1", ["a"], ["text a"], vectors(1), D)
    assert store.get_vectors("kt-v1", ["a"]) == [None] and store.texts("kt") == {}


def test_compare_and_set_activation(store):
    assert store.active_version("kt") is None
    assert not store.compare_and_set_active("kt", "kt-v0", "kt-v1")  # expected a pointer that is not there
    assert store.compare_and_set_active("kt", None, "kt-v1")
    assert not store.compare_and_set_active("kt", None, "kt-v2")  # lost: someone set it first
    assert store.compare_and_set_active("kt", "kt-v1", "kt-v2")
    assert store.active_version("kt") == "kt-v2" and store.active_version("nr") is None


def test_concurrent_activations_have_exactly_one_winner(store):
    wins: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        wins[n] = store.compare_and_set_active("nr", None, f"nr-v{n}")

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [n for n, won in wins.items() if won]
    assert len(wins) == 8 and len(winners) == 1
    assert store.active_version("nr") == f"nr-v{winners[0]}"


def test_interactions_and_jobs(store):
    ids = store.log_interactions(
        "kt", [{"user_id": "u1", "item_id": "a", "correct": "1"}, {"user_id": "u1", "item_id": "b", "correct": "0"}]
    )
    assert len(ids) == 2 and ids[0] != ids[1]
    entries = store.read_interactions("kt")
    assert [entry_id for entry_id, _ in entries] == ids
    assert entries[1][1] == {"user_id": "u1", "item_id": "b", "correct": "0"}
    assert store.read_interactions("nr") == []
    store.enqueue_job({"id": "j1", "status": "queued", "task": "kt"})
    assert store.get_job("j1") == {"id": "j1", "status": "queued", "task": "kt"}
    assert store.get_job("j2") is None


def test_trim_interactions_removes_only_up_to_the_id_and_past_the_retention(store):
    ids = store.log_interactions("kt", [{"user_id": f"u{n}", "item_id": "a", "correct": "1"} for n in range(5)])
    assert store.trim_interactions("kt", ids[2], older_than_s=3600) == 0  # all logged just now: kept
    assert store.trim_interactions("kt", ids[2]) == 3
    assert [entry_id for entry_id, _ in store.read_interactions("kt")] == ids[3:]
    assert store.count_interactions("kt") == 2 and store.count_interactions("nr") == 0
    assert store.log_segments_dir() is None
    store.set_log_segments_dir("/data/log")
    assert store.log_segments_dir() == "/data/log"


def test_rows_keep_the_digest_of_their_text_until_the_table_is_dropped(store):
    from gramrec.service.store.items import text_digest

    store.load_table("kt-v1", ["x"], vectors(1), D)
    store.compare_and_set_active("kt", None, "kt-v1")
    store.put_items("kt", "kt-v1", ["a"], ["text a"], vectors(1), D)
    store.add_vectors("kt-v1", ["b"], vectors(1), D, texts=["text b"])
    store.add_vectors("kt-v1", ["c"], vectors(1), D)
    assert store.text_digests("kt-v1", ["a", "b", "c", "x"]) == {"a": text_digest("text a"), "b": text_digest("text b")}
    store.drop_table("kt-v1")
    assert store.text_digests("kt-v1", ["a", "b"]) == {}


def test_a_reloaded_table_keeps_no_digest_of_the_rows_it_replaced(store):
    """A Redis table key lost alone (eviction, a stray DEL) is reloaded with catalog vectors: the digests of the
    API texts its rows had been encoded from must go with it, or activation would trust rows it no longer has."""
    store.load_table("kt-v1", ["a"], vectors(1), D)
    store.add_vectors("kt-v1", ["a"], vectors(1), D, texts=["edited text"])
    if isinstance(store, RedisStore):
        store.client.unlink(store.key("table", "kt-v1"))  # the table alone, as an eviction would
    else:
        store.drop_table("kt-v1")
    assert store.load_table("kt-v1", ["a"], vectors(1), D)
    assert store.text_digests("kt-v1", ["a"]) == {}


def test_ping(store):
    assert store.ping()


def test_redis_half_loaded_table_is_never_visible(tmp_path):
    """A load that dies midway leaves no table key, only a staging key that is cleaned up."""
    client = redis_client()
    prefix = f"gramrec-test-{uuid.uuid4().hex[:12]}:"
    store = RedisStore(client, prefix)
    seen_table_during_load = []
    original = client.pipeline

    class FailingPipeline:
        def __init__(self):
            self.inner = original(transaction=False)
            self.executed = 0

        def hset(self, *args, **kwargs):
            self.inner.hset(*args, **kwargs)

        def execute(self):
            seen_table_during_load.append(store.has_table("kt-v1"))
            self.executed += 1
            if self.executed == 2:
                raise redis.ConnectionError("connection lost")
            return self.inner.execute()

    client.pipeline = lambda transaction=True: FailingPipeline()
    try:
        ids = [f"i{n}" for n in range(20_000)]
        with pytest.raises(redis.ConnectionError):
            store.load_table("kt-v1", ids, vectors(len(ids)), D)
        client.pipeline = original
        assert seen_table_during_load == [False, False]
        assert not store.has_table("kt-v1")
        assert list(client.scan_iter(match=prefix + "*")) == []
    finally:
        client.pipeline = original
        drop_prefix(client, prefix)


def test_vector_rows_validation():
    assert vector_rows(np.zeros((2, 3)), 3) == [bytes(12), bytes(12)]
    with pytest.raises(ValueError, match="finite"):
        vector_rows(np.array([[np.nan, 0, 0]]), 3)
    with pytest.raises(ValueError, match="shape"):
        vector_rows(np.zeros((2, 4)), 3)
