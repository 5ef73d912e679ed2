"""End to end: real exported (tiny) models served by a real `gramrec serve` process on loopback, over Redis.

Also the registry on real bundles (table load from the artifact) and the bootstrap that trains on first start.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from gramrec.service.artifact import list_versions
from gramrec.service.bundle import ModelBundle
from gramrec.service.settings import ServiceSettings
from tests.helpers.fakes import REDIS_URL, drop_prefix, redis_client
from tests.helpers.serve_process import ServeProcess

TOKEN = "e2e-token"
@pytest.fixture(scope="module")
def server(exported_artifacts, tmp_path_factory):
    """`gramrec serve` in a subprocess on a free loopback port; stopped (and its Redis keys dropped) after."""
    client = redis_client()
    prefix = f"gramrec-test-{uuid.uuid4().hex[:12]}:"
    env = {
        "REDIS_URL": REDIS_URL,
        "GRAMREC_REDIS_KEY_PREFIX": prefix,
        "GRAMREC_ARTIFACTS_DIR": str(exported_artifacts),
        "GRAMREC_ADMIN_TOKEN": TOKEN,
    }
    process = ServeProcess(tmp_path_factory.mktemp("serve-e2e") / "serve.log", env)
    try:
        yield process.start().url
    finally:
        process.stop()
        drop_prefix(client, prefix)


def test_added_item_is_served_by_a_real_server(server, exported_artifacts):
    bundle = ModelBundle.load(exported_artifacts, "kt-e2e-v1", providers=["CPUExecutionProvider"])
    text = "Write a method that returns true if a string is a palindrome."
    with httpx.Client(base_url=server, timeout=10) as http:
        response = http.post("/items", json={"task": "kt", "items": [{"item_id": "palindrome", "text": text}]})
        assert response.status_code == 200, response.text
        assert response.json() == {"model_version": "kt-e2e-v1", "item_ids": ["palindrome"]}
        body = {
            "task": "kt",
            "history": [{"item_id": "kt-item-1", "correct": True}, {"item_id": "palindrome", "correct": 0}],
            "targets": ["palindrome", "kt-item-2"],
        }
        response = http.post("/predict", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
    ids, table = bundle.item_embeddings()
    new = bundle.encode_texts([text])[0]
    history = np.stack([table[ids.index("kt-item-1")], new])
    expected = bundle.predict_kt(history, np.array([1, 0]), np.stack([new, table[ids.index("kt-item-2")]]))
    assert result["model_version"] == "kt-e2e-v1"
    np.testing.assert_allclose([p["probability"] for p in result["predictions"]], expected, rtol=1e-5, atol=1e-6)


def test_news_and_admin_on_a_real_server(server):
    with httpx.Client(base_url=server, timeout=10) as http:
        body = {
            "task": "nr",
            "history": ["nr-item-0", "nr-item-1"],
            "candidates": ["nr-item-2", "nr-item-3", "fresh"],
            "items": [{"item_id": "fresh", "text": "Local team wins the cup"}],
        }
        result = http.post("/predict", json=body).json()
        assert result["model_version"] == "nr-e2e-v1" and sorted(result["ranking"]) == [
            "fresh",
            "nr-item-2",
            "nr-item-3",
        ]
        models = http.get("/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert models["active"] == {"kt": "kt-e2e-v1", "nr": "nr-e2e-v1"}
        assert http.get("/admin/models").status_code == 401
        assert "gramrec_items" in http.get("/metrics").text


def test_bootstrap_skips_tasks_without_data(tmp_path, caplog):
    from gramrec.trainer.bootstrap import bootstrap

    settings = ServiceSettings(
        artifacts_dir=tmp_path / "artifacts", bootstrap_kt_data=tmp_path / "no-kt", bootstrap_nr_data=tmp_path / "no-nr"
    )
    with caplog.at_level("WARNING", logger="gramrec.service"):
        assert bootstrap(settings) == ["kt", "nr"]
    assert "no training data" in caplog.text and list_versions(tmp_path / "artifacts") == []


def test_bootstrap_trains_and_exports_a_missing_task(tmp_path, tiny_encoder_dir, shared_data, monkeypatch):
    """First start on real CodeWorkout data (tiny encoder, 2 steps), then the app serves the new version."""
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app
    from gramrec.trainer.bootstrap import bootstrap

    monkeypatch.setenv("GRAMREC_TRAIN_HIDDEN_DIM", "8")  # a `gramrec train` variable: a first start must not read it
    settings = ServiceSettings(
        bootstrap_train={"encoder_dir": str(tiny_encoder_dir), "hidden_dim": 16, "progress": False},
        artifacts_dir=tmp_path / "artifacts",
        embedded_store_path=tmp_path / "store.sqlite3",
        redis_url=None,
        tasks=["kt"],
        bootstrap_kt_data=shared_data / "codeworkout_s19",
        bootstrap_max_steps_per_epoch=2,
        bootstrap_device="cpu",
        model_poll_interval_s=0,
    )
    assert bootstrap(settings) == []
    (manifest,) = list_versions(settings.artifacts_dir)
    assert manifest["task"] == "kt" and manifest["strategy"] == "gram"
    from gramrec.trainer.checkpoint import read_config

    assert read_config(Path(manifest["source_checkpoint"]))["settings"]["hidden_dim"] == 16
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["models"] == {"kt": manifest["version"]}
        item = json.loads((settings.artifacts_dir / manifest["version"] / "items.json").read_text())["ids"][0]
        response = client.post("/predict", json={"task": "kt", "targets": [item]})
        assert response.status_code == 200 and 0 < response.json()["predictions"][0]["probability"] < 1


def test_real_bundle_serves_its_dataset_texts(exported_artifacts, tmp_path):
    """A real export's items.json texts are readable through GET /items/{id} and the paged listing."""
    from fastapi.testclient import TestClient

    from gramrec.service.app import create_app
    from tests.helpers.checkpoints import ITEM_TEXTS

    settings = ServiceSettings(
        artifacts_dir=exported_artifacts, embedded_store_path=tmp_path / "store.sqlite3", redis_url=None,
        tasks=["kt"], model_poll_interval_s=0, bootstrap=False,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/items/kt-item-3", params={"task": "kt"}).json()["text"] == ITEM_TEXTS["kt"][3]
        page = client.get("/items", params={"task": "kt", "offset": 10, "limit": 5}).json()
        assert page["total"] == 12 and page["next_offset"] is None
        assert [item["text"] for item in page["items"]] == ITEM_TEXTS["kt"][10:]
