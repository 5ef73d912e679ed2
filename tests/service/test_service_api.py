"""The HTTP API through FastAPI's TestClient, on both stores, with a numpy fake of ModelBundle."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from gramrec.service.app import create_app
from gramrec.service.settings import Limits
from gramrec.service.store.items import decode_rows
from tests.helpers.fakes import ADMIN_TOKEN, DIM, REDIS_URL, FakeArtifacts, FakeBundle, text_vector

KT1 = "kt-20260101T000000-aaaaaa"
KT2 = "kt-20260202T000000-bbbbbb"
NR1 = "nr-20260101T000000-aaaaaa"
TOKEN = ADMIN_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def artifacts() -> FakeArtifacts:
    return FakeArtifacts(FakeBundle(KT1, "kt"), FakeBundle(NR1, "nr"))


def kt_expected(bundle: FakeBundle, history: list[tuple[str, int]], targets: list[str], texts: dict | None = None):
    texts = bundle.texts | (texts or {})
    vec = lambda i: text_vector(texts[i])  # noqa: E731
    h = np.stack([vec(i) for i, _ in history]) if history else np.zeros((0, DIM), np.float32)
    return bundle.predict_kt(h, np.array([c for _, c in history]), np.stack([vec(t) for t in targets]))


# -- predict ---------------------------------------------------------------------------------------------------------
def test_predict_kt(client, artifacts):
    body = {
        "task": "kt",
        "history": [
            {"item_id": "kt1", "correct": True},
            {"item_id": "kt2", "correct": 0},
            {"item_id": "kt1", "correct": 1},
        ],
        "targets": ["kt3", "kt1"],
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model_version"] == KT1
    assert [p["item_id"] for p in result["predictions"]] == ["kt3", "kt1"]
    expected = kt_expected(artifacts.bundles[KT1], [("kt1", 1), ("kt2", 0), ("kt1", 1)], ["kt3", "kt1"])
    np.testing.assert_allclose([p["probability"] for p in result["predictions"]], expected, rtol=1e-6)


def test_predict_kt_with_empty_history(client):
    response = client.post("/predict", json={"task": "kt", "targets": ["kt3"]})
    assert response.status_code == 200 and response.json()["predictions"][0]["probability"] == pytest.approx(0.5)


def test_predict_nr_ranks_by_score(client):
    body = {"task": "nr", "history": ["nr1", "nr2", "nr3"], "candidates": ["nr4", "nr5", "nr6", "nr7"]}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model_version"] == NR1
    scores = {s["item_id"]: s["score"] for s in result["scores"]}
    assert [s["item_id"] for s in result["scores"]] == body["candidates"]
    assert result["ranking"] == sorted(scores, key=scores.get, reverse=True)


def test_unknown_items_are_named(client):
    body = {"task": "nr", "history": ["nr1", "ghost-1"], "candidates": ["nr2", "ghost-2", "ghost-1"]}
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]["unknown_items"] == ["ghost-1", "ghost-2"]
    response = client.post("/predict", json={"task": "kt", "history": [], "targets": ["kt1", "nope"]})
    assert response.status_code == 422 and response.json()["detail"]["unknown_items"] == ["nope"]


def test_unknown_items_with_text_are_encoded_for_the_request_only(client, artifacts):
    texts = {"fresh": "a brand new exercise on loops"}
    body = {
        "task": "kt",
        "history": [{"item_id": "fresh", "correct": 1}],
        "targets": ["kt1", "fresh"],
        "items": [{"item_id": "fresh", "text": texts["fresh"]}, {"item_id": "kt1", "text": "ignored: known"}],
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    expected = kt_expected(artifacts.bundles[KT1], [("fresh", 1)], ["kt1", "fresh"], texts)
    np.testing.assert_allclose([p["probability"] for p in response.json()["predictions"]], expected, rtol=1e-6)
    assert artifacts.bundles[KT1].encoded[-1:] == [texts["fresh"]]  # only the unknown item was encoded
    assert client.get("/items/kt/fresh").status_code == 404  # not stored


def test_no_model_for_task_is_503_and_not_ready(make_client, backend):
    client = make_client(backend, artifacts=FakeArtifacts(FakeBundle(KT1, "kt")))
    response = client.post("/predict", json={"task": "nr", "history": ["a"], "candidates": ["b"]})
    assert response.status_code == 503 and "no model loaded for task 'nr'" in response.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["detail"]["missing_tasks"] == ["nr"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert make_client(backend, tasks="kt").get("/readyz").json() == {"status": "ready", "models": {"kt": KT1}, "load_errors": {}}


def test_ready_when_every_task_has_a_warm_model(client, artifacts):
    assert client.get("/readyz").status_code == 200
    assert all(bundle.warmed for bundle in artifacts.bundles.values())


# -- items -----------------------------------------------------------------------------------------------------------
def test_added_item_is_used_by_predict(client, artifacts):
    text = "Write a method that reverses a linked list."
    response = client.post("/items", json={"task": "kt", "items": [{"item_id": "new.item_1", "text": text}]})
    assert response.status_code == 200, response.text
    assert response.json() == {"model_version": KT1, "item_ids": ["new.item_1"]}
    item = client.get("/items/kt/new.item_1").json()
    assert item == {"item_id": "new.item_1", "text": text, "model_version": KT1, "dim": DIM}
    body = {"task": "kt", "history": [{"item_id": "new.item_1", "correct": 0}], "targets": ["new.item_1", "kt2"]}
    predictions = client.post("/predict", json=body).json()["predictions"]
    expected = kt_expected(artifacts.bundles[KT1], [("new.item_1", 0)], ["new.item_1", "kt2"], {"new.item_1": text})
    np.testing.assert_allclose([p["probability"] for p in predictions], expected, rtol=1e-6)


def test_get_model_item_and_missing_item(client):
    item = client.get("/items/nr/nr3").json()
    assert item == {"item_id": "nr3", "text": "text of nr3", "model_version": NR1, "dim": DIM}
    assert client.get("/items/nr/absent").status_code == 404
    assert client.get("/items/xx/nr3").status_code == 422
    assert client.get("/items/nr/a:b").status_code == 422
    assert client.get("/items/nr3").json() == item  # by id alone: looked up in each served task
    assert client.get("/items/nr3", params={"task": "nr"}).json() == item
    assert client.get("/items/nr3", params={"task": "kt"}).status_code == 404
    assert client.get("/items/absent").status_code == 404
    assert client.get("/items/a*b").status_code == 422


def test_nocontent_model_cannot_add_items(make_client, backend):
    arts = FakeArtifacts(FakeBundle(KT1, "kt", has_encoder=False))
    client = make_client(backend, artifacts=arts, tasks="kt")
    response = client.post("/items", json={"task": "kt", "items": [{"item_id": "n1", "text": "t"}]})
    assert response.status_code == 409 and "no content encoder" in response.json()["detail"]
    body = {"task": "kt", "targets": ["n1"], "items": [{"item_id": "n1", "text": "t"}]}
    response = client.post("/predict", json=body)
    assert response.status_code == 422 and response.json()["detail"]["unknown_items"] == ["n1"]


# -- interactions ----------------------------------------------------------------------------------------------------
def test_interactions_are_logged(client, backend):
    kt = {
        "task": "kt",
        "user_id": "student-7",
        "events": [
            {"item_id": "kt1", "correct": True, "timestamp": "2026-11-01T10:00:00Z"},
            {"item_id": "kt2", "correct": 0},
        ],
    }
    response = client.post("/interactions", json=kt)
    assert response.status_code == 201, response.text
    kt_ids = response.json()["ids"]
    nr = {
        "task": "nr",
        "user_id": "U1",
        "history": ["N1", "N2"],
        "impressions": [{"item_id": "N3", "clicked": True}, {"item_id": "N4", "clicked": False}],
    }
    nr_ids = client.post("/interactions", json=nr).json()["ids"]
    assert len(kt_ids) == 2 and len(nr_ids) == 1
    settings = client.app.state.settings
    if backend == "redis":  # what a retrain worker will read
        raw = redis.Redis.from_url(REDIS_URL).xrange(f"{settings.redis_key_prefix}interactions:kt")
        entries = [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in raw]
    else:
        entries = client.app.state.store.read_interactions("kt")
    assert [i for i, _ in entries] == kt_ids
    assert entries[0][1] == {
        "user_id": "student-7",
        "item_id": "kt1",
        "correct": "1",
        "timestamp": "2026-11-01T10:00:00+00:00",
    }
    assert entries[1][1]["correct"] == "0"
    ((_, news),) = client.app.state.store.read_interactions("nr")
    assert news["history"] == "N1 N2" and news["impressions"] == "N3-1 N4-0" and news["user_id"] == "U1"


# -- admin -----------------------------------------------------------------------------------------------------------
ADMIN_CALLS = [
    ("post", "/admin/retrain", {"task": "kt"}),
    ("get", "/admin/models", None),
    ("get", "/admin/jobs/" + "0" * 32, None),
    ("post", f"/admin/models/{KT1}/activate", None),
]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_admin_requires_the_token(make_client, method, path, body):
    client = make_client("embedded")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.request(method, path, json=body, headers=AUTH).status_code in (200, 202, 404)


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_admin_is_off_without_a_configured_token(make_client, method, path, body):
    client = make_client("embedded", admin_token=None)
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 403 and "GRAMREC_ADMIN_TOKEN" in response.json()["detail"]


def test_retrain_mode_is_validated_and_recorded(client):
    response = client.post("/admin/retrain", json={"task": "kt", "mode": "full"}, headers=AUTH)
    assert response.status_code == 202 and response.json()["params"] == {"mode": "full"}
    bad = client.post("/admin/retrain", json={"task": "nr", "mode": "partial"}, headers=AUTH)
    assert bad.status_code == 422 and "mode" in json.dumps(bad.json())


def test_retrain_is_queued(client, backend):
    response = client.post("/admin/retrain", json={"task": "nr", "epochs": 2}, headers=AUTH)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["task"] == "nr" and job["params"] == {"epochs": 2}
    assert client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json() == job
    assert client.get("/admin/jobs/" + "f" * 32, headers=AUTH).status_code == 404
    assert client.get("/admin/jobs/not-a-job", headers=AUTH).status_code == 422
    if backend == "redis":
        prefix = client.app.state.settings.redis_key_prefix
        assert redis.Redis.from_url(REDIS_URL).lrange(f"{prefix}retrain-queue", 0, -1) == [job["id"].encode()]


def test_models_and_rollback(client, artifacts):
    text = "an item added before the switch"
    client.post("/items", json={"task": "kt", "items": [{"item_id": "added", "text": text}]})
    artifacts.add(FakeBundle(KT2, "kt", n_items=5))
    models = client.get("/admin/models", headers=AUTH).json()
    assert models["active"] == {"kt": KT1, "nr": NR1}
    assert [(m["version"], m["active"]) for m in models["models"]] == [(KT2, False), (KT1, True), (NR1, True)]

    response = client.post(f"/admin/models/{KT2}/activate", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"task": "kt", "model_version": KT2}
    body = {"task": "kt", "history": [{"item_id": "added", "correct": 1}], "targets": ["kt4"]}
    result = client.post("/predict", json=body).json()
    assert result["model_version"] == KT2  # its table holds the API-added item, re-encoded by the new version
    assert client.get("/admin/models", headers=AUTH).json()["active"]["kt"] == KT2
    assert client.post("/predict", json={"task": "kt", "targets": ["kt10"]}).status_code == 422  # not in KT2

    response = client.post(f"/admin/models/{KT1}/activate", headers=AUTH)  # roll back
    assert response.json()["model_version"] == KT1
    assert client.post("/predict", json={"task": "kt", "targets": ["kt10"]}).json()["model_version"] == KT1
    assert client.post("/admin/models/kt-nothere/activate", headers=AUTH).status_code == 404
    assert client.post("/admin/models/bad:name/activate", headers=AUTH).status_code == 422


def test_a_rollback_re_encodes_items_whose_text_changed_since_and_only_those(client, artifacts):
    """Texts edited while a newer version served are re-encoded when an older version is activated again: the
    API-added item the old table encoded from its first text, and a dataset item whose text the API replaced."""
    items = [{"item_id": "edited", "text": "first wording"}, {"item_id": "steady", "text": "never changes"}]
    assert client.post("/items", json={"task": "kt", "items": items}).status_code == 200
    artifacts.add(FakeBundle(KT2, "kt", n_items=5))
    assert client.post(f"/admin/models/{KT2}/activate", headers=AUTH).status_code == 200
    edits = [{"item_id": "edited", "text": "second wording"}, {"item_id": "kt3", "text": "kt3 reworded"}]
    assert client.post("/items", json={"task": "kt", "items": edits}).status_code == 200
    old = artifacts.bundles[KT1]
    old.encoded.clear()

    assert client.post(f"/admin/models/{KT1}/activate", headers=AUTH).status_code == 200  # roll back
    store = client.app.state.store
    rows, missing = decode_rows(store.get_vectors(KT1, ["edited", "kt3", "steady"]), DIM)
    assert not missing
    np.testing.assert_allclose(rows, np.stack([text_vector(t) for t in ("second wording", "kt3 reworded", "never changes")]))
    assert sorted(set(old.encoded)) == ["kt3 reworded", "second wording"]  # the unchanged row is left alone


def test_other_processes_follow_an_activation(make_client, backend, artifacts):
    """Two apps on one store stand for two workers: B follows A's switch, and B's stale write is redone."""
    a = make_client(backend)
    settings = a.app.state.settings
    b = make_client(
        backend, redis_key_prefix=settings.redis_key_prefix, embedded_store_path=settings.embedded_store_path
    )
    artifacts.add(FakeBundle(KT2, "kt", n_items=5))
    assert a.post(f"/admin/models/{KT2}/activate", headers=AUTH).status_code == 200
    assert b.get("/readyz").json()["models"]["kt"] == KT1  # B has not polled yet
    # B still holds KT1: its write finds the pointer moved, follows it, and encodes with KT2.
    response = b.post("/items", json={"task": "kt", "items": [{"item_id": "late", "text": "late item"}]})
    assert response.status_code == 200 and response.json()["model_version"] == KT2
    assert a.get("/items/kt/late").json()["model_version"] == KT2
    assert b.app.state.registry.sync("nr").version == NR1
    assert b.post("/predict", json={"task": "kt", "targets": ["late"]}).json()["model_version"] == KT2


def test_predict_in_another_worker_sees_added_items_at_once_and_replaced_ones_within_a_second(make_client, backend):
    """/predict reads catalog items from its worker's in-process index: an item added through another worker is read
    from the store until the index has it, and a replaced vector reaches the index within index_refresh_s."""
    a = make_client(backend)
    settings = a.app.state.settings
    b = make_client(
        backend, redis_key_prefix=settings.redis_key_prefix, embedded_store_path=settings.embedded_store_path
    )
    body = {"task": "kt", "history": [{"item_id": "kt1", "correct": 1}], "targets": ["fresh", "kt3"]}
    assert a.post("/items", json={"task": "kt", "items": [{"item_id": "fresh", "text": "a new one"}]}).status_code == 200
    assert b.post("/predict", json=body).json() == a.post("/predict", json=body).json()  # at once, no text needed
    before = b.post("/predict", json=body).json()
    assert a.post("/items", json={"task": "kt", "items": [{"item_id": "kt3", "text": "kt3 reworded"}]}).status_code == 200
    expected = a.post("/predict", json=body).json()
    assert expected != before
    deadline = time.monotonic() + 1.0
    while b.post("/predict", json=body).json() != expected:
        assert time.monotonic() < deadline, "the replaced vector did not reach the other worker within 1 s"
        time.sleep(0.02)


# -- limits and malformed input ----------------------------------------------------------------------------------------
def kt(history=1, targets=("kt1",), **extra) -> dict:
    return {"task": "kt", "history": [{"item_id": "kt1", "correct": 1}] * history, "targets": list(targets)} | extra


BAD_PREDICTS = {
    "history too long": kt(history=11),
    "too many targets": kt(targets=[f"kt{i}" for i in range(6)]),
    "too many candidates": {"task": "nr", "history": ["nr1"], "candidates": [f"nr{i}" for i in range(7)]},
    "too many texts": kt(items=[{"item_id": f"x{i}", "text": "t"} for i in range(5)]),
    "text too long": kt(items=[{"item_id": "x", "text": "y" * 101}]),
    "empty text": kt(items=[{"item_id": "x", "text": ""}]),
    "colon id": kt(targets=["a:b"]),
    "star id": kt(targets=["x*"]),
    "brace id": kt(targets=["{y}"]),
    "space id": kt(targets=["a b"]),
    "empty id": kt(targets=[""]),
    "long id": kt(targets=["a" * 129]),
    "non-ascii id": kt(targets=["caf\u00e9"]),
    "colon id in history": {"task": "kt", "history": [{"item_id": "k:1", "correct": 1}], "targets": ["kt1"]},
    "duplicate targets": kt(targets=["kt1", "kt1"]),
    "duplicate candidates": {"task": "nr", "history": ["nr1"], "candidates": ["nr2", "nr2"]},
    "duplicate texts": kt(items=[{"item_id": "x", "text": "a"}, {"item_id": "x", "text": "b"}]),
    "no targets": kt(targets=[]),
    "unknown task": {"task": "xx", "targets": ["a"]},
    "no task": {"targets": ["a"]},
    "unknown field": kt(extra_field=1),
    "correct as a word": {"task": "kt", "history": [{"item_id": "kt1", "correct": "yes"}], "targets": ["kt1"]},
    "correct as 2": {"task": "kt", "history": [{"item_id": "kt1", "correct": 2}], "targets": ["kt1"]},
    "targets not a list": {"task": "kt", "targets": "kt1"},
    "body not an object": [1, 2],
}

LIMITS = Limits(
    max_history=10,
    max_targets=5,
    max_candidates=6,
    max_items_per_request=4,
    max_text_chars=100,
    max_events=3,
    max_body_bytes=4096,
)


@pytest.fixture(scope="module")
def limited_client(tmp_path_factory):
    arts = FakeArtifacts(FakeBundle(KT1, "kt"), FakeBundle(NR1, "nr"))
    from gramrec.service.settings import ServiceSettings

    path = tmp_path_factory.mktemp("limits")
    settings = ServiceSettings(
        redis_url=None,
        embedded_store_path=path / "s.sqlite3",
        artifacts_dir=path,
        limits=LIMITS,
        model_poll_interval_s=0,
        admin_token=TOKEN,
    )
    with TestClient(
        create_app(settings, load_bundle=arts.load, list_versions=arts.list_versions), raise_server_exceptions=False
    ) as client:
        yield client


@pytest.mark.parametrize("name", list(BAD_PREDICTS))
def test_bad_predict_requests_are_clear_4xx(limited_client, name):
    response = limited_client.post("/predict", json=BAD_PREDICTS[name])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail and all("msg" in e and "loc" in e for e in detail)


def test_limits_allow_requests_at_the_limit(limited_client):
    body = kt(
        history=10,
        targets=[f"kt{i}" for i in range(5)],
        items=[{"item_id": f"x{i}", "text": "y" * 100} for i in range(4)],
    )
    assert limited_client.post("/predict", json=body).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b'{"task": "kt", "history": [{"item_id": "kt1", "correct": NaN}], "targets": ["kt1"]}',
        b'{"task": "kt", "history": [], "targets": [NaN]}',
        b'{"task": "kt", "user_id": "u", "events": [{"item_id": "kt1", "correct": 1, "timestamp": Infinity}]}',
        b'{"task": "kt", "targets": ["kt1"]',
        b"not json at all",
        b"",
    ],
)
def test_nan_and_invalid_json_are_422(limited_client, raw):
    for path in ("/predict", "/interactions", "/items"):
        response = limited_client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        assert "NaN" not in response.text and "Infinity" not in response.text


def test_oversized_body_is_413(limited_client):
    body = kt(items=[{"item_id": "x", "text": "y" * 5000}])
    response = limited_client.post("/predict", json=body)
    assert response.status_code == 413
    response = limited_client.post(
        "/items",
        content=iter([b'{"task": "kt", "items": [', b" " * 5000, b"]}"]),
        headers={"Content-Type": "application/json"},
    )  # chunked: no Content-Length
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        {"task": "kt", "items": [{"item_id": f"i{n}", "text": "t"} for n in range(5)]},
        {"task": "kt", "items": []},
        {"task": "kt", "items": [{"item_id": "a:b", "text": "t"}]},
        {"task": "kt", "items": [{"item_id": "i", "text": "t" * 101}]},
        {"task": "kt", "items": [{"item_id": "i", "text": "a"}, {"item_id": "i", "text": "b"}]},
        {"task": "zz", "items": [{"item_id": "i", "text": "a"}]},
    ],
)
def test_bad_item_requests(limited_client, body):
    assert limited_client.post("/items", json=body).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"task": "kt", "user_id": "u", "events": [{"item_id": "a", "correct": 1}] * 4},
        {"task": "kt", "user_id": "u:1", "events": [{"item_id": "a", "correct": 1}]},
        {"task": "kt", "user_id": "u", "events": []},
        {"task": "kt", "user_id": "u", "events": [{"item_id": "a", "correct": 1, "timestamp": "yesterday"}]},
        {"task": "nr", "user_id": "u", "impressions": [{"item_id": "a", "clicked": 1}] * 2},
        {"task": "nr", "user_id": "u", "history": ["h"] * 11, "impressions": [{"item_id": "a", "clicked": 1}]},
        {"task": "nr", "user_id": "u", "impressions": [{"item_id": "a", "clicked": "maybe"}]},
    ],
)
def test_bad_interactions(limited_client, body):
    assert limited_client.post("/interactions", json=body).status_code == 422


# -- errors, metrics, store round trips ---------------------------------------------------------------------------
def test_unexpected_errors_are_json_500_without_internals(make_client, artifacts, monkeypatch):
    client = make_client("embedded")

    def broken(*args):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(artifacts.bundles[KT1], "predict_kt", broken)
    response = client.post("/predict", json={"task": "kt", "targets": ["kt1"]})
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}


def test_store_outage_is_503(client, monkeypatch):
    def down(*args):
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(client.app.state.store, "get_vectors", down)
    response = client.post("/predict", json={"task": "kt", "targets": ["not-in-the-catalog"]})  # only the store knows
    assert response.status_code == 503 and response.json() == {"detail": "item store unavailable"}
    assert client.post("/predict", json={"task": "kt", "targets": ["kt1"]}).status_code == 200  # the worker's catalog


def test_metrics(client):
    client.post("/predict", json={"task": "kt", "targets": ["kt1"]})
    client.post("/predict", json={"task": "kt", "targets": ["zzz"]})
    client.get("/items/kt/kt1")
    text = client.get("/metrics").text
    assert 'gramrec_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0' in text
    assert 'gramrec_http_requests_total{endpoint="/predict",method="POST",status="422"} 1.0' in text
    assert 'gramrec_http_requests_total{endpoint="/items/{task}/{item_id}",method="GET",status="200"} 1.0' in text
    assert (
        'gramrec_http_request_duration_seconds_bucket{endpoint="/predict",le="0.005",method="POST",status="200"}'
        in text
    )
    assert f'gramrec_active_model{{task="kt",version="{KT1}"}} 1.0' in text
    assert 'gramrec_items{task="nr"} 20.0' in text


def test_metrics_show_the_interaction_log_held_in_the_store(client):
    events = [{"item_id": "kt1", "correct": 1}, {"item_id": "kt2", "correct": 0}]
    assert client.post("/interactions", json={"task": "kt", "user_id": "s1", "events": events}).status_code == 201
    text = client.get("/metrics").text
    assert 'gramrec_interaction_log_entries{task="kt"} 2.0' in text
    assert 'gramrec_interaction_log_entries{task="nr"} 0.0' in text


class CommandCounter:
    """Records every Redis round trip of a client: plain commands and pipeline executions."""

    def __init__(self, client: redis.Redis):
        self.calls: list[str] = []
        execute_command, pipeline = client.execute_command, client.pipeline

        def counted_command(*args, **kwargs):
            self.calls.append(str(args[0]))
            return execute_command(*args, **kwargs)

        def counted_pipeline(*args, **kwargs):
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            def counted_execute(*a, **k):
                self.calls.append("pipeline:" + ",".join(str(c[0][0]) for c in pipe.command_stack))
                return execute(*a, **k)

            pipe.execute = counted_execute
            return pipe

        client.execute_command, client.pipeline = counted_command, counted_pipeline


def test_a_request_reads_its_items_in_one_round_trip_at_most(make_client):
    """Catalog items come from the worker's in-process index (no round trip); the rest in one read."""
    client = make_client("redis")
    client.post("/items", json={"task": "nr", "items": [{"item_id": "warm", "text": "t"}]})  # loads the Lua script
    counter = CommandCounter(client.app.state.store.client)
    history = [{"item_id": f"kt{i % 20}", "correct": i % 2} for i in range(100)]
    assert (
        client.post("/predict", json={"task": "kt", "history": history, "targets": ["kt1", "kt2"]}).status_code == 200
    )
    assert counter.calls == []
    counter.calls.clear()
    body = {
        "task": "nr",
        "history": [f"nr{i}" for i in range(15)],
        "candidates": ["nr16", "new"],
        "items": [{"item_id": "new", "text": "fresh news"}],
    }
    assert client.post("/predict", json=body).status_code == 200
    assert counter.calls == ["HMGET"]  # "new" only: it may have been added through another worker
    counter.calls.clear()
    assert client.get("/items/nr/nr3").status_code == 200
    assert counter.calls == ["pipeline:HGET,HGET"]
    counter.calls.clear()
    assert client.post("/items", json={"task": "nr", "items": [{"item_id": "n", "text": "t"}]}).status_code == 200
    assert counter.calls == ["EVALSHA"]  # vectors, texts and the active-version check in one script


# -- trainer liveness ------------------------------------------------------------------------------------------------
def test_retrain_says_when_no_trainer_is_alive(client):
    response = client.post("/admin/retrain", json={"task": "kt"}, headers=AUTH)
    assert response.status_code == 202
    job = response.json()
    assert job["trainers_alive"] == 0 and "no trainer is alive" in job["warning"]
    again = client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()
    assert again["trainers_alive"] == 0 and again["warning"] == job["warning"]


def test_retrain_with_a_live_trainer_has_no_warning(client):
    store = client.app.state.store
    store.put_beacon("trainer", "host-a:12", {"status": "idle"}, 30)
    job = client.post("/admin/retrain", json={"task": "kt"}, headers=AUTH).json()
    assert job["trainers_alive"] == 1 and job["warning"] is None
    store.put_beacon("trainer", "host-b:7", {"status": "idle"}, 30)
    assert client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["trainers_alive"] == 2
    store.drop_beacon("trainer", "host-a:12")
    store.drop_beacon("trainer", "host-b:7")
    assert "no trainer" in client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["warning"]


# -- listing items, texts, content types, docs, schema, metrics labels -------------------------------------------
def test_items_are_listed_with_paging(client):
    first = client.get("/items", params={"task": "kt", "limit": 8})
    assert first.status_code == 200, first.text
    page = first.json()
    assert page["total"] == 20 and page["model_version"] == KT1 and page["next_offset"] == 8
    assert [item["item_id"] for item in page["items"]] == [f"kt{i}" for i in range(8)]
    assert page["items"][0] == {"item_id": "kt0", "text": "text of kt0", "source": "model"}
    added = client.post("/items", json={"task": "kt", "items": [{"item_id": "new-1", "text": "a new exercise"}]})
    assert added.status_code == 200
    last = client.get("/items", params={"task": "kt", "offset": 16, "limit": 8}).json()
    assert last["total"] == 21 and last["next_offset"] is None
    assert [item["item_id"] for item in last["items"]] == ["kt16", "kt17", "kt18", "kt19", "new-1"]
    assert last["items"][-1] == {"item_id": "new-1", "text": "a new exercise", "source": "api"}
    assert client.get("/items", params={"task": "kt", "offset": 40}).json()["items"] == []


@pytest.mark.parametrize("params", [{}, {"task": "xx"}, {"task": "kt", "limit": 0}, {"task": "kt", "limit": 1001},
                                    {"task": "kt", "offset": -1}])
def test_item_listing_checks_its_query(client, params):
    response = client.get("/items", params=params)
    assert response.status_code == 422, response.text


def test_dataset_items_have_their_text(client):
    assert client.get("/items/kt3", params={"task": "kt"}).json()["text"] == "text of kt3"
    assert client.get("/items/nr/nr2").json()["text"] == "text of nr2"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_415(client, content_type):
    body = b'{"task": "kt", "targets": ["kt1"]}'
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert "Content-Type: application/json" in detail
    assert ("missing" in detail) if content_type is None else (content_type in detail)
    ok = client.post("/predict", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_docs_are_served_without_a_cdn(client):
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and "cdn.jsdelivr" not in html.text and "unpkg" not in html.text
        assert f"/static-offline-docs/{asset}" in html.text
        script = client.get(f"/static-offline-docs/{asset}")
        assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/static-offline-docs/swagger-ui.css").status_code == 200


def test_openapi_has_an_example_for_every_body_and_the_limits(make_client):
    client = make_client("embedded", limits=Limits(max_history=77, max_candidates=33))
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    bodies = 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation:
                continue
            bodies += 1
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            refs = [variant["$ref"] for variant in body.get("oneOf", [body])]
            for ref in refs:
                assert components[ref.rsplit("/", 1)[1]].get("examples"), f"{method} {path}: {ref} has no example"
    assert bodies >= 4  # predict, items, interactions, admin/retrain
    assert components["KTPredictRequest"]["properties"]["history"]["maxItems"] == 77
    assert components["NRPredictRequest"]["properties"]["candidates"]["maxItems"] == 33
    assert components["ItemText"]["properties"]["text"]["maxLength"] == 10_000


def test_metrics_label_every_route(client):
    for path in ("/docs", "/openapi.json", "/redoc", "/static-offline-docs/swagger-ui.css", "/no/such/path"):
        client.get(path)
    text = client.get("/metrics").text
    for endpoint in ("/docs", "/openapi.json", "/redoc", "/static-offline-docs"):
        assert f'endpoint="{endpoint}"' in text, endpoint
    assert 'endpoint="unmatched",method="GET",status="404"' in text
