"""Security of the admin surface and of model loading: token checks, no token in logs, artifacts confined to the
configured directory and verified before use, no pickle, CORS off unless configured.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
from fastapi.testclient import TestClient

from gramrec.service import auth as service_auth
from gramrec.service.app import create_app
from gramrec.service.artifact import ArtifactError, list_versions
from gramrec.service.bundle import ModelBundle
from gramrec.service.settings import ServiceSettings
from tests.helpers.fakes import FakeArtifacts, FakeBundle
from tests.helpers.redis_server import RedisServer
from tests.helpers.serve_process import ROOT, ServeProcess

TOKEN = "tok-7f3a9c1e5b2d4068a1b2c3d4e5f60718"  # distinctive, so any occurrence in a log is this token
KT = "kt-e2e-v1"
FAKE_KT, FAKE_NR = "kt-20260101T000000-aaaaaa", "nr-20260101T000000-aaaaaa"
EXAMPLE_ARGS = {"version": FAKE_KT, "job_id": "0" * 32}


def fake_client(tmp_path: Path, **overrides) -> TestClient:
    artifacts = FakeArtifacts(FakeBundle(FAKE_KT, "kt"), FakeBundle(FAKE_NR, "nr"))
    settings = ServiceSettings(
        **{
            "redis_url": None,
            "embedded_store_path": tmp_path / "store.sqlite3",
            "artifacts_dir": tmp_path / "artifacts",
            "model_poll_interval_s": 0,
            "bootstrap": False,
            "admin_token": TOKEN,
        }
        | overrides
    )
    return TestClient(
        create_app(settings, load_bundle=artifacts.load, list_versions=artifacts.list_versions),
        raise_server_exceptions=False,
    )


def admin_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every admin operation the app has (including ones added later), with example path parameters."""
    routes = []
    for template, methods in client.app.openapi()["paths"].items():
        if template.startswith("/admin"):
            path = re.sub(r"{(\w+)}", lambda m: EXAMPLE_ARGS.get(m.group(1), "x"), template)
            routes += [(method.upper(), path) for method in methods]
    assert len(routes) >= 4
    return routes


# -- admin token ------------------------------------------------------------------------------------------------------
BAD_CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer wrong"},
    "empty bearer": {"Authorization": "Bearer "},
    "prefix of the token": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token plus a byte": {"Authorization": f"Bearer {TOKEN}x"},
    "other case": {"Authorization": f"Bearer {TOKEN.upper()}"},
    "basic scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without scheme": {"Authorization": TOKEN},
    "token in a query": {},  # sent as ?token= below: never accepted from a URL
    "non-ASCII": {"Authorization": "Bearer t\u00f6k".encode()},
}


def test_every_admin_endpoint_needs_the_token(tmp_path):
    with fake_client(tmp_path) as client:
        for method, path in admin_routes(client):
            for name, headers in BAD_CREDENTIALS.items():
                url = path + (f"?token={TOKEN}" if name == "token in a query" else "")
                response = client.request(method, url, headers=headers, json={"task": "kt"})
                assert response.status_code == 401, (method, path, name, response.text)
                assert TOKEN not in response.text
            ok = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, json={"task": "kt"})
            assert ok.status_code not in (401, 403), (method, path, ok.text)


@pytest.mark.parametrize("configured", [None, "", "   "])
def test_admin_is_refused_entirely_without_a_configured_token(tmp_path, configured):
    with fake_client(tmp_path, admin_token=configured) as client:
        assert client.app.state.settings.admin_token is None
        for method, path in admin_routes(client):
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
                response = client.request(method, path, headers=headers, json={"task": "kt"})
                assert response.status_code == 403, (method, path, response.text)


def test_the_token_is_compared_in_constant_time(tmp_path, monkeypatch):
    """The check goes through secrets.compare_digest (hmac's), never ==, whatever the token given."""
    calls = []
    real = service_auth.secrets.compare_digest

    def spy(given, expected):
        calls.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(service_auth.secrets, "compare_digest", spy)
    with fake_client(tmp_path) as client:
        for token in ("x", TOKEN[:-1], TOKEN):
            client.get("/admin/models", headers={"Authorization": f"Bearer {token}"})
    assert [given for given, _ in calls] == [b"x", TOKEN[:-1].encode(), TOKEN.encode()]
    assert all(expected == TOKEN.encode() for _, expected in calls)
    tree = ast.parse(Path(service_auth.__file__).read_text())
    compares = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    assert not any(isinstance(op, ast.Eq | ast.NotEq) for node in compares for op in node.ops)


def test_the_token_is_not_in_the_settings_repr():
    settings = ServiceSettings(admin_token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


def test_the_token_never_reaches_the_logs(tmp_path, exported_artifacts):
    """A real server, logging at DEBUG, handles wrong and right tokens, admin errors and a store outage."""
    redis_server = RedisServer(tmp_path / "redis").start()
    server = ServeProcess(
        tmp_path / "serve.log",
        {
            "REDIS_URL": redis_server.url,
            "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts),
            "GRAMREC_TASKS": "kt",
            "GRAMREC_ADMIN_TOKEN": TOKEN,
            "GRAMREC_LOG_LEVEL": "DEBUG",
        },
    )
    right = {"Authorization": f"Bearer {TOKEN}"}
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/admin/models", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
            assert http.get("/admin/models", headers=right).status_code == 200
            assert http.post("/admin/models/kt-missing/activate", headers=right).status_code == 404
            assert http.post("/admin/retrain", headers=right, json={"task": "kt", "bogus": 1}).status_code == 422
            redis_server.kill()
            assert http.post("/admin/retrain", headers=right, json={"task": "kt"}).status_code == 503
            assert http.get("/admin/models", headers=right).status_code == 503
    finally:
        server.stop()
        redis_server.close()
    log = server.log()
    assert "item store error" in log  # the outage was logged, so logging was on
    assert TOKEN not in log and TOKEN[:12] not in log


# -- structured, quiet logs -------------------------------------------------------------------------------------------
def test_logs_are_json_and_quiet_by_default(tmp_path, exported_artifacts):
    """At the default level a healthy server says nothing per request; what it does log is one JSON object a line."""
    redis_server = RedisServer(tmp_path / "redis").start()
    env = {"REDIS_URL": redis_server.url, "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts), "GRAMREC_TASKS": "kt"}
    server = ServeProcess(tmp_path / "serve.log", env)
    body = {"task": "kt", "history": [{"item_id": "kt-item-1", "correct": 1}], "targets": ["kt-item-2"]}
    try:
        server.start()
        started = len(server.log())
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for _ in range(20):
                assert http.post("/predict", json=body).status_code == 200
            assert http.post("/predict", json={"task": "kt", "targets": ["nope"]}).status_code == 422
        redis_server.kill()
        unindexed = {"task": "kt", "targets": ["not-in-the-catalog"]}  # only the store could know it
        assert httpx.post(server.url + "/predict", json=unindexed, timeout=10).status_code == 503
    finally:
        server.stop()
        redis_server.close()
    lines = [line for line in server.log()[started:].splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is JSON
    assert entries, "the store outage must be logged"
    assert {e["level"] for e in entries} <= {"warning", "error", "critical"}
    # No access log: no entry of uvicorn's access logger, and no message naming a successful /predict (the whole
    # line is not searched: a timestamp such as "...T00:01:49.200Z" holds a "200" of its own).
    assert not any(e.get("logger", "").startswith("uvicorn.access") for e in entries), entries
    assert not any("/predict" in str(e.get("event", "")) and " 200" in str(e.get("event", "")) for e in entries)


# -- artifacts --------------------------------------------------------------------------------------------------------
@pytest.fixture
def artifacts_root(tmp_path, exported_artifacts) -> Path:
    """A private copy of the exported kt version, safe to tamper with."""
    root = tmp_path / "artifacts"
    shutil.copytree(exported_artifacts / KT, root / KT)
    return root


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def no_sessions(monkeypatch):
    """Fails the test if ONNX Runtime is asked to build a session: loading must stop before that."""
    created = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: created.append(a) or pytest.fail("loaded"))
    return created


@pytest.mark.parametrize("name", ["head.onnx", "encoder.onnx", "items.safetensors", "items.json",
                                  "tokenizer/tokenizer.json"])
def test_a_tampered_file_is_refused_before_anything_is_loaded(artifacts_root, name, no_sessions):
    flip_byte(artifacts_root / KT / name)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        ModelBundle.load(artifacts_root, KT, providers=["CPUExecutionProvider"])
    assert no_sessions == []


def test_an_added_file_is_refused(artifacts_root, no_sessions):
    (artifacts_root / KT / "extra.pkl").write_bytes(pickle.dumps({"evil": True}))
    with pytest.raises(ArtifactError, match="not listed in manifest"):
        ModelBundle.load(artifacts_root, KT, providers=["CPUExecutionProvider"])


def test_a_symlinked_file_is_refused_even_with_the_right_checksum(artifacts_root, tmp_path, no_sessions):
    outside = tmp_path / "outside-head.onnx"
    shutil.move(artifacts_root / KT / "head.onnx", outside)
    (artifacts_root / KT / "head.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symlink"):
        ModelBundle.load(artifacts_root, KT, providers=["CPUExecutionProvider"])


def test_a_version_directory_linked_from_outside_is_refused(tmp_path, exported_artifacts, no_sessions):
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / KT).symlink_to(exported_artifacts / KT, target_is_directory=True)  # a valid version, but elsewhere
    with pytest.raises(ArtifactError, match="not a version directory"):
        ModelBundle.load(root, KT, providers=["CPUExecutionProvider"])
    assert list_versions(root) == []


@pytest.mark.parametrize("name", ["../kt-other/head.onnx", "/etc/passwd", "tokenizer/../../x", "a\\..\\b"])
def test_a_manifest_naming_files_outside_its_directory_is_refused(artifacts_root, name, no_sessions):
    manifest_path = artifacts_root / KT / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unsafe file name"):
        ModelBundle.load(artifacts_root, KT, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "version", ["../kt-e2e-v1", "kt-..", "kt-e2e-v1/../kt-e2e-v1", "/tmp/kt-e2e-v1", "kt-e2e-v1\x00"]
)
def test_version_names_cannot_reach_outside_the_root(artifacts_root, version, no_sessions):
    with pytest.raises(ArtifactError, match="invalid version name"):
        ModelBundle.load(artifacts_root, version, providers=["CPUExecutionProvider"])


def test_activating_a_tampered_version_is_a_422_and_keeps_the_active_one(tmp_path, exported_artifacts):
    """Through the API with the real loader: the bad version names its problem, the good one stays active."""
    root = tmp_path / "artifacts"
    shutil.copytree(exported_artifacts / KT, root / KT)
    shutil.copytree(exported_artifacts / KT, root / "kt-e2e-v2")
    manifest = json.loads((root / "kt-e2e-v2" / "manifest.json").read_text())
    manifest["version"], manifest["created"] = "kt-e2e-v2", "0000"  # older: kt-e2e-v1 is adopted at start
    (root / "kt-e2e-v2" / "manifest.json").write_text(json.dumps(manifest))
    flip_byte(root / "kt-e2e-v2" / "head.onnx")
    settings = ServiceSettings(
        redis_url=None, embedded_store_path=tmp_path / "store.sqlite3", artifacts_dir=root, tasks=["kt"],
        model_poll_interval_s=0, bootstrap=False, admin_token=TOKEN,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/readyz").json()["models"] == {"kt": KT}
        response = client.post("/admin/models/kt-e2e-v2/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 422 and "checksum mismatch" in response.json()["detail"], response.text
        assert client.get("/readyz").json()["models"] == {"kt": KT}


@pytest.mark.parametrize("with_good_older_version", [True, False])
def test_a_bad_newest_version_does_not_stop_the_service(tmp_path, exported_artifacts, with_good_older_version):
    """First start with a corrupt newest export: the next newest serves, or the task is unready; no crash loop."""
    root = tmp_path / "artifacts"
    shutil.copytree(exported_artifacts / KT, root / "kt-e2e-v2")
    manifest = json.loads((root / "kt-e2e-v2" / "manifest.json").read_text())
    manifest["version"], manifest["created"] = "kt-e2e-v2", "9999"  # newest
    (root / "kt-e2e-v2" / "manifest.json").write_text(json.dumps(manifest))
    flip_byte(root / "kt-e2e-v2" / "encoder.onnx")
    if with_good_older_version:
        shutil.copytree(exported_artifacts / KT, root / KT)
    settings = ServiceSettings(
        redis_url=None, embedded_store_path=tmp_path / "store.sqlite3", artifacts_dir=root, tasks=["kt"],
        model_poll_interval_s=0, bootstrap=False,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        if with_good_older_version:
            assert ready.status_code == 200 and ready.json()["models"] == {"kt": KT}
        else:
            assert ready.status_code == 503 and ready.json()["detail"]["missing_tasks"] == ["kt"]


# -- no pickle --------------------------------------------------------------------------------------------------------
LOADING_MODULES = ["service/bundle.py", "service/registry.py", *sorted(f"service/store/{p.name}" for p in (ROOT / "service" / "store").glob("*.py")),
                   "service/inference.py", "service/app.py"]


def test_loading_never_unpickles(tmp_path, exported_artifacts, monkeypatch):
    """Every unpickling entry point raises while a real app starts, loads both models, serves and adds an item."""

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during model loading")

    class RefusingUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(np, "load", refuse)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", refuse)
    settings = ServiceSettings(
        redis_url=None, embedded_store_path=tmp_path / "store.sqlite3", artifacts_dir=exported_artifacts,
        model_poll_interval_s=0, bootstrap=False,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        added = client.post("/items", json={"task": "kt", "items": [{"item_id": "n", "text": "loops"}]})
        assert added.status_code == 200
        body = {"task": "nr", "history": ["nr-item-1"], "candidates": ["nr-item-2"]}
        assert client.post("/predict", json=body).status_code == 200


def test_loading_modules_do_not_import_pickle_or_torch():
    """Source scan backing the runtime test: no pickle-capable loader is even imported on the serving path."""
    forbidden = {"pickle", "_pickle", "cPickle", "dill", "joblib", "torch", "cloudpickle", "shelve", "marshal"}
    for name in LOADING_MODULES:
        source = (ROOT / name).read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not imported & forbidden, f"{name} imports {imported & forbidden}"
        assert "allow_pickle" not in source and "weights_only=False" not in source, name
    # The serving path loads without torch and without the trainer (whose checkpoint code uses torch).
    check = ("import sys, gramrec.service.bundle, gramrec.service.app; "
             "print(sorted(m for m in sys.modules if m in ('torch', 'safetensors.torch') or m.startswith('gramrec.trainer')))")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# -- CORS -------------------------------------------------------------------------------------------------------------
def test_cors_is_off_by_default(tmp_path):
    with fake_client(tmp_path) as client:
        response = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        preflight = client.options(
            "/predict",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(tmp_path):
    with fake_client(tmp_path, cors_origins="https://app.example") as client:
        allowed = client.get("/healthz", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-credentials" not in allowed.headers
