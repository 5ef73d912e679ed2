"""Faults on real processes: a real `gramrec serve` (tiny exported models) over a private redis-server that the
tests hang, kill and restart (never the shared one on 6379), and the API process itself killed mid-write.

Every load loop is bounded in requests and in time, and talks to loopback only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from gramrec.service.bundle import ModelBundle
from tests.helpers.load import Load
from tests.helpers.redis_server import RedisServer
from tests.helpers.serve_process import ServeProcess

KT = "kt-e2e-v1"
PREFIX = "gramrec:"
STORE_ERROR_BOUND_S = 4.0  # redis_timeout_s (2) + a retry's backoff + slack for 2 busy cores
RECOVERY_BOUND_S = 5.0
PREDICT = {
    "task": "kt",
    "history": [{"item_id": "kt-item-1", "correct": 1}, {"item_id": "kt-item-2", "correct": 0}],
    "targets": ["kt-item-3"],
}
UNINDEXED = {"task": "kt", "history": [{"item_id": "not-in-the-catalog", "correct": 1}], "targets": ["kt-item-3"]}


STORE_CALLS = [
    ("POST", "/items", {"task": "kt", "items": [{"item_id": "during-outage", "text": "a new exercise"}]}),
    ("GET", "/items/kt/kt-item-1", None),
    ("GET", "/items/kt-item-1", None),
    ("POST", "/interactions", {"task": "kt", "user_id": "u1", "events": [{"item_id": "kt-item-1", "correct": 1}]}),
]


def predict(client: httpx.Client, n: int) -> httpx.Response:
    return client.post("/predict", json=PREDICT)


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - start


def store_serves(url: str) -> bool:
    """An item read from the store's table: what the outage stopped, back (the table reloaded if Redis lost it)."""
    try:
        return httpx.get(url + "/items/kt/kt-item-1", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def predict_ok(url: str) -> bool:
    try:
        return httpx.post(url + "/predict", json=PREDICT, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def timed(method: str, url: str, **kwargs) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.request(method, url, timeout=30, **kwargs)
    return response, time.monotonic() - start


# -- Redis outages under load -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outage(tmp_path_factory, exported_artifacts):
    """A private Redis without persistence and a server on it that follows the store every second."""
    directory = tmp_path_factory.mktemp("outage")
    redis_server = RedisServer(directory / "redis").start()
    server = ServeProcess(
        directory / "serve.log",
        {
            "REDIS_URL": redis_server.url,
            "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts),
            "GRAMREC_TASKS": "kt",
            "GRAMREC_MODEL_POLL_INTERVAL_S": "1",
        },
    )
    try:
        server.start()
        yield redis_server, server
    finally:
        server.stop()
        redis_server.close()


def assert_served_through_outage(load: Load, start: float, end: float) -> None:
    """Every /predict that ran entirely inside the outage was answered from the worker's in-process catalog: a prompt
    200, the store never asked."""
    during = load.between(start, end)
    assert during, "no request ran during the outage"
    for outcome in during:
        assert outcome.status == 200, outcome
        assert outcome.elapsed < STORE_ERROR_BOUND_S, outcome


def assert_readiness_fails(url: str) -> None:
    response, elapsed = timed("GET", url + "/readyz")
    assert response.status_code == 503 and response.json()["detail"]["store"] == "unreachable", response.text
    assert elapsed < STORE_ERROR_BOUND_S
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # alive: do not restart it
    response = httpx.post(url + "/predict", json=UNINDEXED, timeout=10)  # an id only the store could know
    assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
    assert response.json() == {"detail": "item store unavailable"}, response.text
    for method, path, body in STORE_CALLS:  # every endpoint that needs the store: the same prompt, clear 503
        response, elapsed = timed(method, url + path, json=body)
        assert response.status_code == 503, (path, response.text)
        assert response.json() == {"detail": "item store unavailable"}, (path, response.text)
        assert elapsed < STORE_ERROR_BOUND_S, (path, elapsed)


def test_hung_redis_gives_prompt_503_and_recovers(outage):
    """SIGSTOP: connections open but Redis never answers (the case that used to hang a request ~1 minute): what
    needs the store gets a prompt 503, /predict on catalog items goes on from memory."""
    redis_server, server = outage
    with Load(server.url, predict) as load:
        time.sleep(1.0)
        redis_server.pause()
        paused = time.monotonic()
        try:
            time.sleep(STORE_ERROR_BOUND_S + 2)
            assert_readiness_fails(server.url)
        finally:
            redis_server.resume()
        resumed = time.monotonic()
        recovery = wait_until(lambda: store_serves(server.url), RECOVERY_BOUND_S)
    assert_served_through_outage(load, paused, resumed)
    assert {o.status for o in load.outcomes} <= {200, 503}
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    slowest = max(o.elapsed for o in load.between(paused, resumed))
    print(f"hung Redis: slowest /predict {slowest:.3f}s; store calls recovered {recovery:.2f}s after SIGCONT")


def test_redis_killed_and_restarted_empty(outage):
    """SIGKILL, then a fresh Redis with nothing in it: 503 for what needs the store meanwhile (/predict on catalog
    items goes on), then the server reloads its table by itself."""
    redis_server, server = outage
    with Load(server.url, predict) as load:
        time.sleep(1.0)
        redis_server.kill()
        killed = time.monotonic()
        time.sleep(2.0)
        assert_readiness_fails(server.url)
        outage_end = time.monotonic()
        redis_server.start()  # same port, no data: the active pointer and the item table are gone
        recovery = wait_until(lambda: store_serves(server.url), RECOVERY_BOUND_S)
    assert_served_through_outage(load, killed + 0.2, outage_end)
    assert {o.status for o in load.outcomes} <= {200, 503}, [o for o in load.outcomes if o.status not in (200, 503)][:3]
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'gramrec_store_errors_total{error="ConnectionError"}' in metrics
    store_errors = [line for line in server.log().splitlines() if '"item store error"' in line]
    assert store_errors and len(store_errors) < 20  # at the default level, about one line per second of outage
    print(f"Redis restarted empty: serving again {recovery:.2f}s later")


def test_api_started_before_redis_becomes_ready_without_restart(tmp_path, exported_artifacts):
    """Redis down at start: the process stays up, alive and unready, and serves once Redis answers."""
    redis_server = RedisServer(tmp_path / "redis")  # port chosen, not started yet
    server = ServeProcess(
        tmp_path / "serve.log",
        {
            "REDIS_URL": redis_server.url,
            "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts),
            "GRAMREC_TASKS": "kt",
            "GRAMREC_MODEL_POLL_INTERVAL_S": "1",
        },
    )
    try:
        server.start(wait_ready=False)
        wait_until(lambda: healthy(server.url), 60, interval_s=0.2)
        response = httpx.get(server.url + "/readyz", timeout=10)
        assert response.status_code == 503 and response.json()["detail"]["missing_tasks"] == ["kt"]
        assert httpx.post(server.url + "/predict", json=PREDICT, timeout=10).status_code == 503
        redis_server.start()
        ready = wait_until(lambda: predict_ok(server.url), RECOVERY_BOUND_S)
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        assert "item store unreachable at start" in server.log()
        print(f"Redis started after the API: serving {ready:.2f}s later")
    finally:
        server.stop()
        redis_server.close()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# -- the API process killed while writing items -----------------------------------------------------------------------
def test_items_are_whole_or_absent_after_the_api_is_killed(tmp_path, exported_artifacts):
    redis_server = RedisServer(tmp_path / "redis").start()
    server = ServeProcess(
        tmp_path / "serve.log",
        {"REDIS_URL": redis_server.url, "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts), "GRAMREC_TASKS": "kt"},
    )
    per_request = 6

    def add_items(client: httpx.Client, n: int) -> httpx.Response:
        items = [{"item_id": f"new-{n}-{j}", "text": f"exercise {n}.{j}: sum the odd numbers of an array"}
                 for j in range(per_request)]
        return client.post("/items", json={"task": "kt", "items": items})

    try:
        server.start()
        with Load(server.url, add_items, workers=4, max_requests=2000, max_seconds=20) as load:
            time.sleep(2.0)
            server.kill()
        acknowledged = {f"new-{o.n}" for o in load.outcomes if o.status == 200}
        assert acknowledged and any(o.status == 0 for o in load.outcomes), "the kill did not land mid-load"

        client = redis_server.client()
        texts = {k.decode(): v.decode() for k, v in client.hgetall(PREFIX + "texts:kt").items()}
        table = client.hgetall(PREFIX + f"table:{KT}")
        added = {k.decode(): v for k, v in table.items() if k.startswith(b"new-")}
        assert set(texts) == set(added), "a text without its vector or a vector without its text"
        batches: dict[str, set[str]] = {}
        for item_id in texts:
            batches.setdefault(item_id.rsplit("-", 1)[0], set()).add(item_id)
        assert all(len(ids) == per_request for ids in batches.values()), "a request stored in part"
        assert acknowledged <= set(batches)  # every 200 is stored (and maybe requests cut after their write)

        bundle = ModelBundle.load(exported_artifacts, KT, providers=["CPUExecutionProvider"])
        ids = sorted(texts)
        expected = bundle.encode_texts([texts[i] for i in ids])
        stored = np.stack([np.frombuffer(added[i], dtype="<f4") for i in ids])
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)  # each vector is its own text's
        client.close()
    finally:
        server.stop()
        redis_server.close()


# -- acknowledged interactions survive a Redis crash ------------------------------------------------------------------
def test_acknowledged_interactions_survive_a_redis_crash(tmp_path, exported_artifacts):
    """Redis with AOF fsynced on every write (as docker-compose runs it): every 201 is on disk before it is sent."""
    redis_server = RedisServer(tmp_path / "redis", appendonly=True).start()
    server = ServeProcess(
        tmp_path / "serve.log",
        {"REDIS_URL": redis_server.url, "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts), "GRAMREC_TASKS": "kt"},
    )

    def log_answers(client: httpx.Client, n: int) -> httpx.Response:
        events = [{"item_id": f"kt-item-{(n + j) % 12}", "correct": (n + j) % 2} for j in range(3)]
        return client.post("/interactions", json={"task": "kt", "user_id": f"student-{n % 50}", "events": events})

    try:
        server.start()
        with Load(server.url, log_answers, workers=4, max_requests=3000, max_seconds=20) as load:
            time.sleep(1.5)
            redis_server.kill()
            time.sleep(0.5)
        acknowledged = [i for o in load.outcomes if o.status == 201 for i in __import__("json").loads(o.body)["ids"]]
        assert acknowledged and any(o.status == 503 for o in load.outcomes), "the crash did not land mid-load"

        redis_server.start()  # same directory: replays the AOF
        client = redis_server.client()
        stored = {entry_id.decode() for entry_id, _ in client.xrange(PREFIX + "interactions:kt")}
        lost = set(acknowledged) - stored
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged entries lost"
        client.close()
        wait_until(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 200, RECOVERY_BOUND_S)
    finally:
        server.stop()
        redis_server.close()


@pytest.mark.parametrize("appendonly", [False, True])
def test_a_redis_that_may_lose_acknowledged_writes_is_reported(tmp_path, appendonly, caplog):
    from gramrec.service.store.redis_store import RedisStore, warn_unless_durable

    redis_server = RedisServer(tmp_path / "redis", appendonly=appendonly).start()
    store = RedisStore.from_url(redis_server.url)
    try:
        with caplog.at_level("WARNING", logger="gramrec.service"):
            config = warn_unless_durable(store)
        assert config["appendonly"] == ("yes" if appendonly else "no")
        assert ("may lose acknowledged interactions" in caplog.text) is not appendonly
    finally:
        store.close()
        redis_server.close()


def test_store_error_logs_are_throttled(monkeypatch):
    from gramrec.service.http_errors import LogThrottle

    clock = [100.0]
    monkeypatch.setattr("gramrec.service.http_errors.time.monotonic", lambda: clock[0])
    throttle = LogThrottle(interval_s=1.0)
    assert throttle.allow("ConnectionError") == 0
    assert [throttle.allow("ConnectionError") for _ in range(500)] == [None] * 500
    assert throttle.allow("TimeoutError") == 0  # each error type has its own line
    clock[0] += 1.0
    assert throttle.allow("ConnectionError") == 500  # the next line says how many were left out


def test_an_evicted_item_table_is_a_503_then_reloaded(tmp_path):
    """Only the table key lost (eviction, a stray DEL): what needs the table gets 503s and the process is unready,
    never 422s, until the poll; /predict on catalog items goes on from the worker's in-process catalog."""
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app
    from gramrec.service.settings import ServiceSettings
    from tests.helpers.fakes import FakeArtifacts, FakeBundle

    version = "kt-20260101T000000-aaaaaa"
    artifacts = FakeArtifacts(FakeBundle(version, "kt"))
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = ServiceSettings(
        redis_url=redis_server.url, artifacts_dir=tmp_path, tasks=["kt"], model_poll_interval_s=0, bootstrap=False,
        follow_activations=False,
    )
    app = create_app(settings, load_bundle=artifacts.load, list_versions=artifacts.list_versions)
    body = {"task": "kt", "history": [{"item_id": "kt1", "correct": 1}], "targets": ["kt2"]}
    unindexed = {"task": "kt", "history": [{"item_id": "not-in-the-catalog", "correct": 1}], "targets": ["kt2"]}
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            served = client.post("/predict", json=body)
            assert served.status_code == 200
            redis_server.client().delete(f"{PREFIX}table:{version}")
            assert client.post("/predict", json=body).json() == served.json()  # from memory, the same answer
            response = client.post("/predict", json=unindexed)  # only the lost table could know it
            assert response.status_code == 503 and response.json() == {"detail": "item store unavailable"}
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["detail"]["store"] == f"missing item tables: {version}"
            app.state.registry.sync("kt")  # what the poll does every GRAMREC_MODEL_POLL_INTERVAL_S
            response = client.post("/predict", json=unindexed)
            assert response.status_code == 422 and response.json()["detail"]["unknown_items"] == ["not-in-the-catalog"]
            assert client.post("/predict", json=body).status_code == 200
            assert client.get("/readyz").status_code == 200
    finally:
        redis_server.close()
