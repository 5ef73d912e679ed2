"""POST /recommend and item metadata through the HTTP API, on real Redis and on sqlite, with the numpy fake bundle."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers.fakes import ADMIN_TOKEN, DIM, FakeArtifacts, FakeBundle, text_vector

KT1 = "kt-20260101T000000-aaaaaa"
NR1 = "nr-20260101T000000-aaaaaa"
NR2 = "nr-20260202T000000-bbbbbb"
TOKEN = ADMIN_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_NEWS = 60


@pytest.fixture
def artifacts() -> FakeArtifacts:
    return FakeArtifacts(FakeBundle(KT1, "kt", n_items=30), FakeBundle(NR1, "nr", n_items=N_NEWS))


def brute_force_news(bundle: FakeBundle, history: list[str], texts: dict | None = None) -> list[tuple[str, float]]:
    """Every catalog item scored by the fake's /predict score, best first (history left out)."""
    texts = bundle.texts | (texts or {})
    vec = {i: text_vector(t) for i, t in texts.items()}
    user = np.stack([vec[i] for i in history]).mean(0)
    scored = [(i, float(vec[i] @ user)) for i in texts if i not in history]
    return sorted(scored, key=lambda pair: -pair[1])


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- news ------------------------------------------------------------------------------------------------------------
def test_nr_top_k_is_the_whole_catalog_ranked_by_the_predict_score(client, artifacts):
    result = recommend(client, task="nr", history=["nr1", "nr2"], k=10)
    assert result["model_version"] == NR1 and result["approximate"] is False
    expected = brute_force_news(artifacts.bundles[NR1], ["nr1", "nr2"])[:10]
    assert [item["item_id"] for item in result["items"]] == [i for i, _ in expected]
    np.testing.assert_allclose([item["score"] for item in result["items"]], [s for _, s in expected], rtol=1e-5)
    # the same scores as /predict gives for those candidates
    ids = [item["item_id"] for item in result["items"]]
    predicted = client.post("/predict", json={"task": "nr", "history": ["nr1", "nr2"], "candidates": ids}).json()
    np.testing.assert_allclose(
        [s["score"] for s in predicted["scores"]], [item["score"] for item in result["items"]], rtol=1e-5
    )
    assert predicted["ranking"] == ids
    assert result["items"][0]["category"] in ("sports", "news")  # the base catalog's metadata comes along


def test_nr_filters(client, artifacts):
    history = ["nr0"]
    full = [i for i, _ in brute_force_news(artifacts.bundles[NR1], history)]
    sports = recommend(client, task="nr", history=history, k=5, category="sports")["items"]
    assert [i["item_id"] for i in sports] == [i for i in full if int(i[2:]) % 2 == 0][:5]
    assert {i["category"] for i in sports} == {"sports"}
    sub = recommend(client, task="nr", history=history, k=100, subcategory="sub1")["items"]
    assert [i["item_id"] for i in sub] == [i for i in full if int(i[2:]) % 4 == 1]
    excluded = full[:3]
    rest = recommend(client, task="nr", history=history, k=5, exclude=excluded)["items"]
    assert [i["item_id"] for i in rest] == full[3:8]
    assert recommend(client, task="nr", history=history, category="no-such-category")["items"] == []
    # unknown exclude ids are simply not in the catalog: nothing to leave out
    assert [
        i["item_id"] for i in recommend(client, task="nr", history=history, k=3, exclude=["absent"])["items"]
    ] == full[:3]


def test_added_items_with_metadata_are_recommended_and_filtered_by_freshness(client, artifacts):
    items = [
        {
            "item_id": "fresh1",
            "text": "Local team wins the cup",
            "category": "sports",
            "published_at": "2026-11-20T08:00:00Z",
        },
        {
            "item_id": "fresh2",
            "text": "Rates rise again",
            "category": "finance",
            "subcategory": "markets",
            "published_at": 1_795_000_000,
        },
        {"item_id": "old1", "text": "An old story", "published_at": "2020-01-01T00:00:00"},
    ]
    assert client.post("/items", json={"task": "nr", "items": items}).status_code == 200
    texts = {i["item_id"]: i["text"] for i in items}
    result = recommend(client, task="nr", history=["nr0"], k=N_NEWS + 3)
    assert {i["item_id"] for i in result["items"]} >= set(texts)  # in the catalog at once
    fresh = recommend(client, task="nr", history=["nr0"], k=10, published_after="2025-01-01T00:00:00Z")["items"]
    assert sorted(i["item_id"] for i in fresh) == ["fresh1", "fresh2"]  # base items have no publication time
    finance = recommend(client, task="nr", history=["fresh1"], category="finance")["items"]
    assert finance == [
        {
            "item_id": "fresh2",
            "score": pytest.approx(float(text_vector(texts["fresh2"]) @ text_vector(texts["fresh1"])), rel=1e-5),
            "category": "finance",
            "subcategory": "markets",
            "published_at": 1_795_000_000.0,
        }
    ]
    # an update replaces the metadata whole
    update = {"item_id": "fresh2", "text": "Rates rise again", "category": "economy"}
    assert client.post("/items", json={"task": "nr", "items": [update]}).status_code == 200
    assert recommend(client, task="nr", history=["fresh1"], category="finance")["items"] == []
    assert [i["item_id"] for i in recommend(client, task="nr", history=["fresh1"], category="economy")["items"]] == [
        "fresh2"
    ]


def test_items_added_through_another_process_reach_its_index_within_a_second(make_client, backend):
    a = make_client(backend, index_refresh_s=0.1)
    settings = a.app.state.settings
    b = make_client(
        backend,
        redis_key_prefix=settings.redis_key_prefix,
        embedded_store_path=settings.embedded_store_path,
        index_refresh_s=0.1,
    )
    item = {"item_id": "elsewhere", "text": "Added through worker A", "category": "weather"}
    assert a.post("/items", json={"task": "nr", "items": [item]}).status_code == 200
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        found = recommend(b, task="nr", history=["nr0"], category="weather")["items"]
        if found:
            break
        time.sleep(0.02)
    assert [i["item_id"] for i in found] == ["elsewhere"], "not in worker B's index after 1 s"


def test_unknown_history_is_named_unless_its_text_comes_along(client):
    response = client.post("/recommend", json={"task": "nr", "history": ["nr1", "ghost"]})
    assert response.status_code == 422 and response.json()["detail"]["unknown_items"] == ["ghost"]
    body = {"task": "nr", "history": ["ghost"], "items": [{"item_id": "ghost", "text": "a news story"}], "k": 3}
    result = recommend(client, **body)
    assert len(result["items"]) == 3 and "ghost" not in [i["item_id"] for i in result["items"]]
    assert client.get("/items/nr/ghost").status_code == 404  # encoded for the request only


def test_a_new_version_brings_its_own_catalog(client, artifacts):
    artifacts.add(FakeBundle(NR2, "nr", n_items=5))
    client.post("/items", json={"task": "nr", "items": [{"item_id": "kept", "text": "an API item", "category": "x"}]})
    assert client.post(f"/admin/models/{NR2}/activate", headers=AUTH).status_code == 200
    result = recommend(client, task="nr", history=["nr0"], k=100)
    assert result["model_version"] == NR2
    assert sorted(i["item_id"] for i in result["items"]) == ["kept", "nr1", "nr2", "nr3", "nr4"]
    assert recommend(client, task="nr", history=["nr0"], category="x")["items"][0]["item_id"] == "kept"


# -- questions -------------------------------------------------------------------------------------------------------
def kt_probabilities(client, history, ids) -> dict[str, float]:
    body = {"task": "kt", "history": history, "targets": ids}
    return {p["item_id"]: p["probability"] for p in client.post("/predict", json=body).json()["predictions"]}


def test_kt_next_questions_closest_to_the_target(client, artifacts):
    history = [{"item_id": "kt1", "correct": True}, {"item_id": "kt2", "correct": False}]
    others = [i for i in artifacts.bundles[KT1].ids if i not in ("kt1", "kt2")]
    p = kt_probabilities(client, history, others)
    for target in (None, 0.3, 0.55):
        body = {"task": "kt", "history": history, "k": 5} | ({"target": target} if target else {})
        result = recommend(client, **body)
        goal = target or 0.7
        expected = sorted(others, key=lambda i: (abs(p[i] - goal), others.index(i)))[:5]
        assert result["model_version"] == KT1
        assert [q["item_id"] for q in result["items"]] == expected
        np.testing.assert_allclose([q["probability"] for q in result["items"]], [p[i] for i in expected], rtol=1e-6)


def test_kt_band_and_subset(client, artifacts):
    history = [{"item_id": "kt3", "correct": 1}]
    others = [i for i in artifacts.bundles[KT1].ids if i != "kt3"]
    p = kt_probabilities(client, history, others)
    low, high = sorted(p.values())[5], sorted(p.values())[20]
    result = recommend(client, task="kt", history=history, k=100, band={"low": low, "high": high})["items"]
    assert {q["item_id"] for q in result} == {i for i in others if low <= p[i] <= high}
    assert all(low <= q["probability"] <= high for q in result)
    subset = ["kt3", "kt4", "kt5", "absent"]
    result = recommend(client, task="kt", history=history, k=10, questions=subset)["items"]
    assert sorted(q["item_id"] for q in result) == ["kt4", "kt5"]  # answered and unknown questions left out


# -- hostile input ---------------------------------------------------------------------------------------------------
BAD_RECOMMEND = {
    "k zero": {"task": "nr", "history": ["nr1"], "k": 0},
    "k over 100": {"task": "nr", "history": ["nr1"], "k": 101},
    "k a string": {"task": "nr", "history": ["nr1"], "k": "10"},
    "k a float": {"task": "nr", "history": ["nr1"], "k": 2.5},
    "k a boolean": {"task": "nr", "history": ["nr1"], "k": True},
    "unknown filter": {"task": "nr", "history": ["nr1"], "color": "red"},
    "kt filter on nr": {"task": "nr", "history": ["nr1"], "target": 0.5},
    "nr filter on kt": {"task": "kt", "category": "sports"},
    "empty nr history": {"task": "nr", "history": []},
    "huge exclude": {"task": "nr", "history": ["nr1"], "exclude": [f"x{i}" for i in range(1001)]},
    "bad exclude id": {"task": "nr", "history": ["nr1"], "exclude": ["a:b"]},
    "bad category": {"task": "nr", "history": ["nr1"], "category": "sp*rts"},
    "empty category": {"task": "nr", "history": ["nr1"], "category": ""},
    "bad published_after": {"task": "nr", "history": ["nr1"], "published_after": "yesterday"},
    "milliseconds": {"task": "nr", "history": ["nr1"], "published_after": 1_700_000_000_000},
    "target 1": {"task": "kt", "target": 1},
    "target NaN": {"task": "kt", "target": "NaN"},
    "low without high": {"task": "kt", "band": {"low": 0.2}},
    "band and target": {"task": "kt", "band": {"low": 0.2, "high": 0.4}, "target": 0.3},
    "low above high": {"task": "kt", "band": {"low": 0.6, "high": 0.4}},
    "band bound a string": {"task": "kt", "band": {"low": "0.2", "high": 0.4}},
    "huge question subset": {"task": "kt", "questions": [f"q{i}" for i in range(1001)]},
    "no task": {"history": ["nr1"]},
    "unknown task": {"task": "xx", "history": ["nr1"]},
}


@pytest.mark.parametrize("name", BAD_RECOMMEND)
def test_bad_recommend_requests_are_clear_422(client, name):
    response = client.post("/recommend", json=BAD_RECOMMEND[name])
    assert response.status_code == 422, response.text
    assert response.json()["detail"], "the answer says what is wrong"


def test_limits_allow_an_exclude_list_at_the_limit(client):
    result = recommend(client, task="nr", history=["nr1"], k=2, exclude=[f"x{i}" for i in range(1000)])
    assert len(result["items"]) == 2


BAD_ITEMS = {
    "bad category": {"item_id": "m1", "text": "t", "category": "a:b"},
    "long category": {"item_id": "m1", "text": "t", "category": "c" * 65},
    "category a number": {"item_id": "m1", "text": "t", "category": 5},
    "bad subcategory": {"item_id": "m1", "text": "t", "subcategory": " leading space"},
    "published_at text": {"item_id": "m1", "text": "t", "published_at": "last week"},
    "published_at negative": {"item_id": "m1", "text": "t", "published_at": -5},
    "published_at milliseconds": {"item_id": "m1", "text": "t", "published_at": 1_700_000_000_000},
    "unknown metadata": {"item_id": "m1", "text": "t", "author": "me"},
}


@pytest.mark.parametrize("name", BAD_ITEMS)
def test_bad_item_metadata_is_422_and_stores_nothing(client, name):
    good = {"item_id": "m0", "text": "a good item in the same request"}
    response = client.post("/items", json={"task": "nr", "items": [good, BAD_ITEMS[name]]})
    assert response.status_code == 422, response.text
    assert client.get("/items/nr/m0").status_code == 404 and client.get("/items/nr/m1").status_code == 404
    assert "m0" not in {i["item_id"] for i in recommend(client, task="nr", history=["nr1"], k=100)["items"]}


def test_index_memory_is_reported_and_bounded(make_client, backend):
    client = make_client(backend)
    metrics = client.get("/metrics").text
    assert 'gramrec_index_items{task="nr"} 60.0' in metrics
    index_bytes = [line for line in metrics.splitlines() if line.startswith('gramrec_index_bytes{task="nr"}')]
    assert index_bytes and float(index_bytes[0].split()[-1]) > N_NEWS * DIM * 4
    tight = make_client(backend, index_max_bytes=1 << 20)  # 1 MiB: room for ~45k rows of 8 floats
    index = tight.app.state.registry.get("nr").index
    index.max_bytes = len(index) * (4 * DIM + 16) + 10  # room for no more item
    response = tight.post("/items", json={"task": "nr", "items": [{"item_id": "big", "text": "no room"}]})
    assert response.status_code == 507 and "index_max_bytes" in response.json()["detail"]
    assert tight.get("/items/nr/big").status_code == 404  # refused before anything was stored
    update = {"item_id": "nr1", "text": "an update takes no new room"}
    assert tight.post("/items", json={"task": "nr", "items": [update]}).status_code == 200
