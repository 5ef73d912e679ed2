"""Hostile input: schemathesis over every endpoint of the OpenAPI schema, then targeted attacks.

Everything runs in-process (ASGI) on the numpy fake bundles, over a private redis-server owned by this module,
so a test can snapshot the *whole* keyspace before and after a request: a rejected request must change no key at
all, an accepted one only the keys it owns.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from gramrec.service.app import create_app
from gramrec.service.settings import Limits, ServiceSettings
from tests.helpers.fakes import FakeArtifacts, FakeBundle
from tests.helpers.redis_server import RedisServer, changed_keys, snapshot

KT1 = "kt-20260101T000000-aaaaaa"
NR1 = "nr-20260101T000000-aaaaaa"
TOKEN = "hostile-input-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 100  # per endpoint and generation mode; the module takes ~25 s on 2 busy cores
# Texts of at most 500 characters: 8 of them stay below the body limit even as \u-escaped surrogate pairs (12
# bytes a character), so a schema-valid body is never a 413.
LIMITS = Limits(max_history=50, max_targets=20, max_candidates=20, max_items_per_request=8, max_text_chars=500,
                max_body_bytes=64 * 1024)

# Schema-valid requests that the API may still refuse with 422, and only for these reasons: a JSON schema cannot
# say "unknown item", "ids unique within a list of objects", the operator's size limits, or fields that conflict.
SEMANTIC_422 = {"unknown items", "duplicate_ids", "too_long", "conflicting_fields"}


def build_app(redis_url: str) -> object:
    artifacts = FakeArtifacts(FakeBundle(KT1, "kt"), FakeBundle(NR1, "nr"))
    settings = ServiceSettings(
        redis_url=redis_url,
        artifacts_dir="/nonexistent-artifacts",
        model_poll_interval_s=0,
        bootstrap=False,
        admin_token=TOKEN,
        limits=LIMITS,
    )
    return create_app(settings, load_bundle=artifacts.load, list_versions=artifacts.list_versions)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-input")).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def api_schema(redis_server):
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(redis_server.url))
    yield schema
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()


def operations() -> list:
    """(label, generation mode) for every operation of the schema, read without starting the app.

    Negative mode only where there is an input to break (parameters or a body).
    """
    paths = build_app("redis://127.0.0.1:1/0").openapi()["paths"]
    cases = []
    for path, methods in paths.items():
        for method, spec in methods.items():
            label = f"{method.upper()} {path}"
            cases.append(pytest.param(label, GenerationMode.POSITIVE, id=f"{label}-positive"))
            if spec.get("parameters") or spec.get("requestBody"):
                cases.append(pytest.param(label, GenerationMode.NEGATIVE, id=f"{label}-negative"))
    return cases


def auth_for(case) -> dict[str, str]:
    """The admin token, unless this case's point is a broken Authorization header (then it is sent as generated)."""
    negative = {location.name.lower() for location, info in case.meta.components.items() if info.mode.is_negative}
    return {} if "header" in negative else AUTH


def semantic_rejection(detail) -> str | None:
    """The reason of a 422 the schema cannot foresee, or None for any other 422."""
    if isinstance(detail, dict) and str(detail.get("msg", "")).startswith("unknown items"):
        return "unknown items"
    if isinstance(detail, list) and detail and all(e.get("type") in SEMANTIC_422 for e in detail):
        return detail[0]["type"]
    return None


@pytest.mark.parametrize("label,mode", operations())
def test_schemathesis(api_schema, label, mode):
    """No 5xx, every response documented and conforming to its schema, schema-invalid input refused."""
    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().label == label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case):
        response = case.call(headers=auth_for(case))
        if mode.is_positive and response.status_code == 422:
            reason = semantic_rejection(response.json()["detail"])
            assert reason is not None, f"schema-valid request refused: {response.text[:500]}"
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        elif mode.is_negative and response.status_code == 413:
            # Schema-invalid and over limits.max_body_bytes (a list past its maxItems can be): refused for its size
            # before its contents are read, which is still a refusal (schemathesis expects a 4xx from its own list).
            assert "max_body_bytes" in response.text, response.text[:500]
            case.validate_response(response, excluded_checks=[negative_data_rejection])
        else:
            case.validate_response(response)

    run()


# -- targeted attacks ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(redis_server):
    with TestClient(build_app(redis_server.url), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def keyspace(redis_server):
    connection = redis_server.client()
    yield lambda: snapshot(connection)
    connection.close()


JSON = {"Content-Type": "application/json"}


def kt(**body) -> dict:
    return {"task": "kt", "targets": ["kt1"]} | body


def items(*ids: str) -> dict:
    return {"task": "kt", "items": [{"item_id": i, "text": f"text {n}"} for n, i in enumerate(ids)]}


def nested(depth: int) -> bytes:
    return b'{"task": "kt", "targets": ["kt1"], "items": ' + b"[" * depth + b"]" * depth + b"}"


# (method, path, json body or raw bytes, expected status, a word the error message must contain)
ATTACKS = {
    "oversized body": ("POST", "/items", items("a") | {"pad": "x" * 70_000}, 413, None),
    "oversized chunked body": ("POST", "/items", iter([b'{"task": "kt", "items": [', b" " * 70_000, b"]}"]), 413, None),
    "deeply nested JSON": ("POST", "/predict", nested(30_000), 422, "nested too deeply"),
    "nested JSON under the recursion limit": ("POST", "/predict", nested(500), 422, "items"),
    "huge history": ("POST", "/predict", kt(history=[{"item_id": "kt1", "correct": 1}] * 500), 422, "at most 50"),
    "huge candidates": ("POST", "/predict", {"task": "nr", "history": ["nr1"], "candidates": ["nr1"] * 5000}, 422,
                        "at most 20"),
    "invalid UTF-8": ("POST", "/items", b'{"task": "kt", "items": [{"item_id": "a", "text": "\xff\xfe"}]}', 422,
                      "UTF-8"),
    "lone surrogate": ("POST", "/items", b'{"task": "kt", "items": [{"item_id": "a", "text": "\\ud800"}]}', 422,
                       "unicode"),
    "NaN": ("POST", "/predict", b'{"task": "kt", "history": [{"item_id": "kt1", "correct": NaN}], "targets": ["kt1"]}',
            422, "correct"),
    "Infinity": ("POST", "/interactions",
                 b'{"task": "kt", "user_id": "u", "events": [{"item_id": "a", "correct": 1, "timestamp": Infinity}]}',
                 422, "timestamp"),
    "timestamp in milliseconds": ("POST", "/interactions", {"task": "kt", "user_id": "u", "events": [
        {"item_id": "a", "correct": 1, "timestamp": 1_700_000_000_000}]}, 422, "Unix seconds"),
    "timestamp before 1970": ("POST", "/interactions", {"task": "kt", "user_id": "u", "events": [
        {"item_id": "a", "correct": 1, "timestamp": -99_999_999_999}]}, 422, "Unix seconds"),
    "huge number": ("POST", "/admin/retrain", b'{"task": "kt", "epochs": ' + b"9" * 5000 + b"}", 422, "number"),
    "duplicate targets": ("POST", "/predict", kt(targets=["kt1", "kt2", "kt1"]), 422, "duplicate ids: kt1"),
    "duplicate candidates": ("POST", "/predict", {"task": "nr", "history": ["nr1"], "candidates": ["nr2", "nr2"]},
                             422, "duplicate ids: nr2"),
    "duplicate items": ("POST", "/items", items("x", "y", "x"), 422, "duplicate ids: x"),
    "duplicate impressions": ("POST", "/interactions", {"task": "nr", "user_id": "u", "impressions": [
        {"item_id": "n1", "clicked": 1}, {"item_id": "n1", "clicked": 0}]}, 422, "duplicate ids: n1"),
    "key separator in item id": ("POST", "/items", items("kt1:evil"), 422, "pattern"),
    "glob in item id": ("POST", "/items", items("*"), 422, "pattern"),
    "hash tag in item id": ("POST", "/items", items("{kt1}"), 422, "pattern"),
    "separator in user id": ("POST", "/interactions", {"task": "kt", "user_id": "u:1", "events": [
        {"item_id": "a", "correct": 1}]}, 422, "pattern"),
    "glob in target": ("POST", "/predict", kt(targets=["kt*"]), 422, "pattern"),
    "separator in path id": ("GET", "/items/kt/kt1:x", None, 422, "pattern"),
    "glob in path id": ("GET", "/items/kt%2A", None, 422, "pattern"),
    "hash tag in path id": ("GET", "/items/kt/%7Bkt1%7D", None, 422, "pattern"),
    "task injection": ("GET", "/items/kt:table/kt1", None, 422, "task"),
    "version traversal": ("POST", "/admin/models/..%2F..%2Fetc%2Fpasswd/activate", None, 404, None),
    "version with dots": ("POST", "/admin/models/kt-../activate", None, 404, "not found"),
    "version with glob": ("POST", "/admin/models/kt-*/activate", None, 422, "pattern"),
    "job id glob": ("GET", "/admin/jobs/*", None, 422, "pattern"),
    "not JSON content type": ("POST", "/predict", b"task=kt", 422, None),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_a_clear_4xx_and_touches_no_key(client, keyspace, name):
    method, path, body, expected, words = ATTACKS[name]
    before = keyspace()
    if isinstance(body, dict):
        response = client.request(method, path, json=body, headers=AUTH)
    else:
        response = client.request(method, path, content=body, headers=AUTH | JSON if body is not None else AUTH)
    assert response.status_code == expected, response.text[:500]
    if words is not None:
        assert words.lower() in response.text.lower(), response.text[:500]
    assert len(response.content) < 4096, "an error must not echo the (hostile) input back"
    assert changed_keys(before, keyspace()) == set()


def test_accepted_writes_touch_only_their_own_keys(client, keyspace):
    """Ids with every allowed special character ('.', '-', '_', '..') stay fields of the request's own keys."""
    before = keyspace()
    response = client.post("/items", json=items("a.b", "-_-", "..", "."))
    assert response.status_code == 200, response.text
    assert changed_keys(before, keyspace()) == {
        b"gramrec:texts:kt",
        f"gramrec:table:{KT1}".encode(),
        b"gramrec:meta:kt",  # metadata for /recommend's filters
        b"gramrec:changes:kt",  # the change log other workers' catalog indexes read
        b"gramrec:changeseq:kt",
        f"gramrec:table-texts:{KT1}".encode(),  # what each row was encoded from, for activation's re-encoding
    }
    before = keyspace()
    body = {"task": "nr", "user_id": "u.1", "impressions": [{"item_id": "nr1", "clicked": 1}]}
    assert client.post("/interactions", json=body).status_code == 201
    assert changed_keys(before, keyspace()) == {b"gramrec:interactions:nr"}


def test_error_detail_is_json_with_a_message(client):
    response = client.post("/predict", content=nested(30_000), headers=JSON)
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == ["body"] and json.dumps(detail)


def test_oversized_bodies_on_a_real_server(tmp_path):
    """Through uvicorn: a 20 MB body, declared or chunked, is a prompt JSON 413 and the server stays up."""
    from tests.helpers.serve_process import ServeProcess

    env = {
        "GRAMREC_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "GRAMREC_EMBEDDED_STORE_PATH": str(tmp_path / "store.sqlite3"),
        "GRAMREC_TASKS": "kt",
    }
    server = ServeProcess(tmp_path / "serve.log", env).start(wait_ready=False)
    size = 20 << 20
    try:
        deadline = time.monotonic() + 60
        while not _answers(server.url + "/healthz"):
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.2)
        bodies = {"declared": b'{"text": "' + b"x" * size + b'"}', "chunked": (b"x" * 65536 for _ in range(size >> 16))}
        for name, body in bodies.items():
            start = time.monotonic()
            response = httpx.post(server.url + "/items", content=body, headers=JSON, timeout=10)
            assert response.status_code == 413, (name, response.text)
            assert "larger than 1048576 bytes" in response.json()["detail"]
            assert time.monotonic() - start < 5, name
        assert _answers(server.url + "/healthz")
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_boolean_is_not_a_number_in_a_retrain_request():
    """JSON true where the schema says number (pydantic's lax mode would read it as 1)."""
    from pydantic import ValidationError

    from gramrec.service.schemas import RetrainRequest

    for field in ("epochs", "time_budget_s"):
        with pytest.raises(ValidationError, match="not a boolean"):
            RetrainRequest.model_validate_json(f'{{"task": "kt", "{field}": true}}')
    assert RetrainRequest.model_validate_json('{"task": "kt", "epochs": 2, "time_budget_s": 30}').epochs == 2
