"""kt's split head (service/kt_scoring.py): POST /recommend scores the catalog from precomputed question parts and
one LSTM pass, and must give exactly /predict's probabilities. Real tiny exports (conftest's exported_artifacts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gramrec.service.app import create_app
from gramrec.service.artifact import ArtifactError, write_manifest
from gramrec.service.bundle import ModelBundle
from gramrec.service.settings import ServiceSettings

VERSION = "kt-e2e-v1"
HISTORY = [
    {"item_id": "kt-item-1", "correct": True},
    {"item_id": "kt-item-4", "correct": False},
    {"item_id": "kt-item-2", "correct": True},
]


def test_the_split_head_gives_the_heads_probabilities(exported_artifacts):
    bundle = ModelBundle.load(exported_artifacts, VERSION, providers=["CPUExecutionProvider"])
    assert bundle.kt_output is not None
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((9, bundle.dim)).astype(np.float32)
    for length in (0, 1, 7):  # an empty history runs from the start state, as predict_kt does
        history = rng.standard_normal((length, bundle.dim)).astype(np.float32)
        correct = rng.integers(0, 2, length)
        expected = bundle.predict_kt(history, correct, targets)
        state = bundle.kt_state(history, correct)
        got = bundle.kt_output.probabilities(state, bundle.kt_output.item_terms(targets))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_recommend_kt_scores_equal_predicts_for_the_same_questions(exported_artifacts, tmp_path):
    settings = ServiceSettings(
        artifacts_dir=exported_artifacts, embedded_store_path=tmp_path / "store.sqlite3", redis_url=None,
        tasks=["kt"], model_poll_interval_s=0, bootstrap=False, follow_activations=False,
    )
    with TestClient(create_app(settings)) as client:
        added = {"task": "kt", "items": [{"item_id": "kt-new-1", "text": "Reverse an array of integers in place."}]}
        assert client.post("/items", json=added).status_code == 200  # its question part is computed on arrival
        band = {"low": 0.0, "high": 1.0}  # every unanswered question, each with its probability
        response = client.post("/recommend", json={"task": "kt", "history": HISTORY, "k": 100, "band": band})
        assert response.status_code == 200, response.text
        recommended = {item["item_id"]: item["probability"] for item in response.json()["items"]}
        assert len(recommended) == 12 - 3 + 1 and "kt-new-1" in recommended
        assert not {answer["item_id"] for answer in HISTORY} & recommended.keys()
        predicted = client.post("/predict", json={"task": "kt", "history": HISTORY, "targets": list(recommended)})
        assert predicted.status_code == 200, predicted.text
        expected = {p["item_id"]: p["probability"] for p in predicted.json()["predictions"]}
        np.testing.assert_allclose([recommended[i] for i in expected], list(expected.values()), rtol=1e-5, atol=1e-6)


def test_a_split_head_that_disagrees_with_the_head_never_serves(exported_artifacts, tmp_path):
    """The golden check covers the split head: different output parts (re-checksummed, so they load) are refused."""
    from safetensors.numpy import load, save

    root = tmp_path / "artifacts"
    shutil.copytree(exported_artifacts / VERSION, root / VERSION)
    path = root / VERSION / "kt_output.safetensors"
    parts = load(path.read_bytes())
    parts["item_bias"] = parts["item_bias"] + 1.0
    path.write_bytes(save(parts))
    manifest = json.loads((root / VERSION / "manifest.json").read_text())
    manifest.pop("files")
    write_manifest(root / VERSION, manifest)
    bundle = ModelBundle.load(root, VERSION, providers=["CPUExecutionProvider"])
    with pytest.raises(ArtifactError, match="kt_parts"):
        bundle.self_check()


def test_the_k_closest_are_those_of_a_full_sort_ties_by_catalog_row():
    from gramrec.service.routers.recommend import _closest_first

    rng = np.random.default_rng(0)
    for n, k in ((50, 10), (50, 50), (9, 10), (1000, 1), (1000, 100)):
        distance = np.round(rng.random(n), 2)  # many ties, at the k-th too
        distance[rng.integers(0, n, 3)] = np.nan  # a broken score sorts last, as before
        rows = rng.permutation(n * 3)[:n]
        np.testing.assert_array_equal(_closest_first(rows, distance, k), np.lexsort((rows, distance))[:k])
