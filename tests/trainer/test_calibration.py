"""The export's kt calibration (trainer/calibration.py): Platt's fit, its refusals, and what a kt export records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gramrec.service.artifact import KT_CALIBRATION_FILE
from gramrec.service.bundle import ModelBundle
from gramrec.service.kt_scoring import IDENTITY, KTCalibration
from gramrec.trainer.calibration import fit_calibration, fit_platt, validation_logits
from gramrec.trainer.checkpoint import load_trained_model
from gramrec.trainer.export import export_checkpoint
from gramrec.trainer.metrics import auc, expected_calibration_error
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.retrain_data import write_kt_data


def sample(a: float, b: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn with P(1 | z) = sigmoid(a z + b): the calibration that fits them is (a, b)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    return z, (rng.random(n) < 1.0 / (1.0 + np.exp(-(a * z + b)))).astype(np.int64)


@pytest.mark.parametrize(("a", "b"), [(1.0, 0.0), (3.0, -0.7), (0.4, 1.2), (12.0, -2.0)])
def test_platt_recovers_the_calibration_the_labels_were_drawn_with(a, b):
    z, y = sample(a, b, 40_000, seed=int(a * 10))
    fitted_a, fitted_b = fit_platt(z, y)
    assert fitted_a == pytest.approx(a, rel=0.08)
    assert fitted_b == pytest.approx(b, abs=0.08 * max(1.0, abs(b)))


def test_platt_is_finite_when_validation_is_perfectly_separated():
    z = np.linspace(-2, 2, 200)
    a, b = fit_platt(z, (z > 0).astype(np.int64))
    assert np.isfinite([a, b]).all() and a > 0


def test_a_squeezed_shifted_model_is_calibrated_and_keeps_its_auc():
    """As the first-start model: the head's probabilities squeezed near 0.49 while the observed rate is ~0.42."""
    z, y = sample(2.0, -0.5, 20_000, seed=3)
    squeezed = z / 20.0 - 0.04  # sigmoid: nearly all within [0.45, 0.53], ~0.07 too high on average
    calibration, record = fit_calibration(squeezed, y)
    assert calibration is not None and calibration.a > 0
    before = 1.0 / (1.0 + np.exp(-squeezed))
    after = calibration.probabilities(squeezed)
    assert record["val_ece_before"] == pytest.approx(expected_calibration_error(y, before))
    assert record["val_ece_after"] == pytest.approx(expected_calibration_error(y, after))
    assert record["val_ece_after"] < record["val_ece_before"] / 3
    assert record["val_mean_predicted_after"] == pytest.approx(y.mean(), abs=0.01)
    assert auc(y, after) == auc(y, before) == record["val_auc_after"] == record["val_auc_before"]
    assert (record["a"], record["b"], record["answers"]) == (calibration.a, calibration.b, y.size)


@pytest.mark.parametrize(
    ("logits", "labels", "reason"),
    [
        (np.linspace(-2, 2, 400), (np.linspace(-2, 2, 400) < 0).astype(np.int64), "not monotone"),
        (np.zeros(10), np.array([0, 1] * 5), "too few validation answers"),
        (np.linspace(-1, 1, 100), np.ones(100, np.int64), "too few validation answers"),
        (np.full(100, np.nan), np.array([0, 1] * 50), "non-finite"),
    ],
    ids=["anti-correlated", "too-few", "one-class", "nan-logits"],
)
def test_no_calibration_is_fitted_where_none_would_be_sound(logits, labels, reason):
    calibration, record = fit_calibration(logits, labels)
    assert calibration is None and reason in record["reason"]


def test_a_kt_export_fits_its_calibration_on_validation_and_serves_it(tmp_path, tiny_encoder_dir):
    data = write_kt_data(tmp_path / "data", users=60)
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", tiny_encoder_dir, "kt", data=data)
    artifact = export_checkpoint(checkpoint, tmp_path / "artifacts", version="kt-calibrated-v1", progress=False)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["kt_calibration"] == KT_CALIBRATION_FILE
    saved = json.loads((artifact / KT_CALIBRATION_FILE).read_text())
    fit = manifest["kt_calibration_fit"]
    assert fit["answers"] == saved["answers"] > 0 and fit["a"] == saved["a"] and fit["b"] == saved["b"]
    assert manifest["metrics"]["val_ece_before"] == fit["val_ece_before"]
    assert manifest["metrics"]["val_ece_after"] == fit["val_ece_after"]
    assert manifest["metrics"]["auc"] == 0.7  # the checkpoint's own metrics are kept
    assert fit["val_auc_after"] == pytest.approx(fit["val_auc_before"], abs=1e-12)
    # the record is the fit of the validation answers the served table gives
    bundle = ModelBundle.load(artifact.parent, artifact.name, providers=["CPUExecutionProvider"])
    _, table = bundle.item_embeddings()
    logits, labels = validation_logits(load_trained_model(checkpoint), torch.from_numpy(table))
    expected, _ = fit_calibration(logits, labels)
    assert expected is not None and labels.size == fit["answers"]
    assert bundle.kt_calibration == KTCalibration(saved["a"], saved["b"])
    assert (bundle.kt_calibration.a, bundle.kt_calibration.b) == pytest.approx((expected.a, expected.b), rel=1e-6)
    bundle.self_check()  # its golden answer is the calibrated one


def test_a_kt_export_without_its_data_is_served_uncalibrated_and_says_why(exported_artifacts):
    manifest = json.loads((exported_artifacts / "kt-e2e-v1" / "manifest.json").read_text())
    assert manifest["kt_calibration"] is None and "no validation data" in manifest["kt_calibration_fit"]["reason"]
    assert "val_ece_after" not in manifest["metrics"]
    assert not (exported_artifacts / "kt-e2e-v1" / KT_CALIBRATION_FILE).exists()
    bundle = ModelBundle.load(exported_artifacts, "kt-e2e-v1", providers=["CPUExecutionProvider"])
    assert bundle.kt_calibration is IDENTITY
