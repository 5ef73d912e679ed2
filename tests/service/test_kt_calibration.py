"""kt calibration (service/kt_scoring.py, KTCalibration): a version's kt_calibration.json is applied on every kt path
(/predict, /recommend's split head and its whole-head fallback), a version without one serves as before, and a bad
file never loads. Real tiny exports (conftest's exported_artifacts, which have no calibration: their data is absent),
given a known calibration here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gramrec.service.app import create_app
from gramrec.service.artifact import KT_CALIBRATION_FILE, KT_OUTPUT_FILE, KT_STATE_FILE, ArtifactError, write_manifest
from gramrec.service.bundle import ModelBundle
from gramrec.service.kt_scoring import IDENTITY, KTCalibration
from gramrec.service.settings import ServiceSettings
from gramrec.trainer.metrics import auc

VERSION = "kt-e2e-v1"
A, B = 2.5, -0.8
CPU = ["CPUExecutionProvider"]
HISTORY = [
    {"item_id": "kt-item-1", "correct": True},
    {"item_id": "kt-item-4", "correct": False},
    {"item_id": "kt-item-2", "correct": True},
]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def copy_version(exported: Path, root: Path, calibration: bytes | None = None, split_head: bool = True) -> Path:
    """The exported kt version under `root`, optionally with a calibration file (its golden answer calibrated with
    A, B) and without its split head (a whole-head version), re-checksummed so it loads."""
    directory = root / VERSION
    shutil.copytree(exported / VERSION, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("files")
    assert manifest.get("kt_calibration") is None  # the fixture's data is absent: exported uncalibrated
    if calibration is not None:
        (directory / KT_CALIBRATION_FILE).write_bytes(calibration)
        manifest["kt_calibration"] = KT_CALIBRATION_FILE
        expected = _sigmoid(A * _logit(manifest["golden"]["expected"]) + B)
        manifest["golden"]["expected"] = expected.tolist()
    if not split_head:
        manifest.pop("kt_parts")
        (directory / KT_STATE_FILE).unlink()
        (directory / KT_OUTPUT_FILE).unlink()
    write_manifest(directory, manifest)
    return root


def platt(a: object = A, b: object = B, **extra) -> bytes:
    return json.dumps({"method": "platt", "a": a, "b": b} | extra).encode()


def random_requests(dim: int, count: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    for length in range(count):
        history = rng.standard_normal((length, dim)).astype(np.float32)
        yield history, rng.integers(0, 2, length), rng.standard_normal((40, dim)).astype(np.float32)


def test_a_calibrated_version_serves_sigmoid_of_a_logit_plus_b(exported_artifacts, tmp_path):
    plain = ModelBundle.load(exported_artifacts, VERSION, providers=CPU)
    calibrated = ModelBundle.load(copy_version(exported_artifacts, tmp_path, platt()), VERSION, providers=CPU)
    assert calibrated.kt_calibration == KTCalibration(A, B) and calibrated.kt_output is not None
    calibrated.self_check()  # its golden answer is the calibrated one
    for history, correct, targets in random_requests(plain.dim):
        logits = calibrated.kt_logits(history, correct, targets)
        np.testing.assert_allclose(logits, _logit(plain.predict_kt(history, correct, targets)), rtol=1e-4, atol=1e-4)
        expected = _sigmoid(A * logits.astype(np.float64) + B)
        got = calibrated.predict_kt(history, correct, targets)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        state = calibrated.kt_state(history, correct)  # the split head ends in the same calibration
        split = calibrated.kt_output.probabilities(state, calibrated.kt_output.item_terms(targets))
        np.testing.assert_allclose(split, got, rtol=1e-5, atol=1e-6)


def test_calibration_keeps_the_ranking_so_auc_is_unchanged(exported_artifacts, tmp_path):
    plain = ModelBundle.load(exported_artifacts, VERSION, providers=CPU)
    calibrated = ModelBundle.load(copy_version(exported_artifacts, tmp_path, platt()), VERSION, providers=CPU)
    rng = np.random.default_rng(1)
    before, after = [], []
    for history, correct, targets in random_requests(plain.dim, count=8):
        before.append(plain.predict_kt(history, correct, targets))
        after.append(calibrated.predict_kt(history, correct, targets))
    before, after = np.concatenate(before), np.concatenate(after)
    labels = (rng.random(before.size) < before).astype(np.int64)
    assert not np.allclose(before, after, atol=1e-3)  # the probabilities did change
    assert auc(labels, after) == pytest.approx(auc(labels, before), abs=1e-12)
    # monotone: in the head's order the calibrated probabilities never decrease (float32 ties only where saturated)
    assert (np.diff(after[np.argsort(before, kind="stable")]) >= 0).all()


def test_a_version_exported_before_calibration_serves_the_heads_sigmoid(exported_artifacts, tmp_path):
    """No kt_calibration in the manifest at all (older exports): the identity, bit for bit the head's sigmoid."""
    directory = copy_version(exported_artifacts, tmp_path) / VERSION
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["kt_calibration"], manifest["kt_calibration_fit"], manifest["files"]
    write_manifest(directory, manifest)
    bundle = ModelBundle.load(tmp_path, VERSION, providers=CPU)
    assert bundle.kt_calibration is IDENTITY and bundle.kt_output.calibration is IDENTITY
    bundle.self_check()
    for history, correct, targets in random_requests(bundle.dim):
        logits = bundle.kt_logits(history, correct, targets)
        np.testing.assert_array_equal(bundle.predict_kt(history, correct, targets), 0.5 * (1 + np.tanh(0.5 * logits)))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (platt(a=0.0), "a must be > 0"),
        (platt(a=-1.5), "a must be > 0"),
        (b'{"method": "platt", "a": NaN, "b": 0.1}', "NaN is not a number"),
        (b'{"method": "platt", "a": 1.0, "b": -Infinity}', "-Infinity is not a number"),
        (platt(a=[1.0, 2.0]), "a must be a finite number"),
        (platt(b=[[0.5]]), "b must be a finite number"),
        (platt(a="2.5"), "a must be a finite number"),
        (platt(a=True), "a must be a finite number"),
        (json.dumps({"method": "platt", "a": 1.0}).encode(), r"missing \['b'\]"),
        (platt(method="isotonic"), "method must be 'platt'"),
        (b"[2.5, -0.8]", "must be a JSON object"),
        (b"a=2.5 b=-0.8", "not JSON"),
    ],
)
def test_a_bad_calibration_file_is_refused_at_load(exported_artifacts, tmp_path, content, problem):
    root = copy_version(exported_artifacts, tmp_path, content)
    with pytest.raises(ArtifactError, match=f"{KT_CALIBRATION_FILE}.*invalid kt calibration.*{problem}"):
        ModelBundle.load(root, VERSION, providers=CPU)


def test_a_calibration_the_golden_answer_does_not_match_never_serves(exported_artifacts, tmp_path):
    """A file that loads but is not the one exported (re-checksummed): the golden check refuses the version."""
    root = copy_version(exported_artifacts, tmp_path, platt(a=A * 1.5))
    with pytest.raises(ArtifactError, match="golden check"):
        ModelBundle.load(root, VERSION, providers=CPU).self_check()


def test_a_manifest_naming_a_missing_calibration_file_is_refused(exported_artifacts, tmp_path):
    directory = copy_version(exported_artifacts, tmp_path, platt()) / VERSION
    (directory / KT_CALIBRATION_FILE).unlink()
    with pytest.raises(ArtifactError, match=KT_CALIBRATION_FILE):
        ModelBundle.load(tmp_path, VERSION, providers=CPU)


@pytest.mark.parametrize("split_head", [True, False], ids=["split-head", "whole-head"])
def test_recommend_and_predict_serve_the_same_calibrated_probabilities(exported_artifacts, tmp_path, split_head):
    root = copy_version(exported_artifacts, tmp_path / "artifacts", platt(), split_head=split_head)
    plain = ModelBundle.load(exported_artifacts, VERSION, providers=CPU)
    settings = ServiceSettings(
        artifacts_dir=root,
        embedded_store_path=tmp_path / "store.sqlite3",
        redis_url=None,
        tasks=["kt"],
        model_poll_interval_s=0,
        bootstrap=False,
        follow_activations=False,
    )
    with TestClient(create_app(settings)) as client:
        band = {"low": 0.0, "high": 1.0}  # every unanswered question, each with its probability
        response = client.post("/recommend", json={"task": "kt", "history": HISTORY, "k": 100, "band": band})
        assert response.status_code == 200, response.text
        recommended = {item["item_id"]: item["probability"] for item in response.json()["items"]}
        assert len(recommended) == 12 - 3
        predicted = client.post("/predict", json={"task": "kt", "history": HISTORY, "targets": list(recommended)})
        assert predicted.status_code == 200, predicted.text
        served = {p["item_id"]: p["probability"] for p in predicted.json()["predictions"]}
    np.testing.assert_allclose([recommended[i] for i in served], list(served.values()), rtol=1e-5, atol=1e-6)
    ids, table = plain.item_embeddings()
    row = {item_id: i for i, item_id in enumerate(ids)}
    history = table[[row[a["item_id"]] for a in HISTORY]]
    correct = np.array([a["correct"] for a in HISTORY], np.int64)
    uncalibrated = plain.predict_kt(history, correct, table[[row[i] for i in served]])
    expected = _sigmoid(A * _logit(uncalibrated) + B)
    np.testing.assert_allclose(list(served.values()), expected, rtol=1e-4, atol=1e-5)
