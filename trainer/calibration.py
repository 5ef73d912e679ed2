"""Calibration of the kt head's probabilities, fitted at export on the validation split (issue #15).

POST /recommend (kt) picks questions whose P(correct) is closest to a target, so the served probabilities must
mean what they say. A short training ranks answers well but squeezes and shifts its probabilities (BENCHMARKS.md
§5), so the export fits Platt scaling, p = sigmoid(a * logit + b), on the validation answers of the checkpoint's
own data and split, scored with the exported item table (what the service serves). The service applies it on
every kt path (service/kt_scoring.py, KTCalibration). With no readable validation data, or a fit that would not be
monotone, the version is exported uncalibrated and the manifest's metrics say why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from gramrec.service.kt_scoring import CALIBRATION_METHOD, KTCalibration
from gramrec.trainer.checkpoint import TrainedModel
from gramrec.trainer.metrics import auc, expected_calibration_error

log = logging.getLogger("gramrec.export")

ECE_BINS = 20  # as bench/calibration_kt.py
MIN_ANSWERS = 20  # fewer validation answers (or fewer than 2 of a class) fit nothing worth serving
MAX_STEPS = 100  # Newton steps; a fit converges in under 10 on real validation sets


def _loss(z: np.ndarray, t: np.ndarray, a: float, b: float) -> float:
    s = a * z + b
    return float(np.mean(np.logaddexp(0.0, s) - t * s))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the mean log-loss of sigmoid(a * logit + b), by Newton's method from the identity (1, 0)
    with a backtracking line search. Targets are Platt's (1999) smoothed labels, (n+ + 1) / (n+ + 2) and
    1 / (n- + 2), so validation answers that the logits separate perfectly still give a finite fit. The caller
    checks a > 0."""
    z = np.asarray(logits, np.float64).ravel()
    y = np.asarray(labels).ravel()
    positives = int(y.sum())
    negatives = y.size - positives
    t = np.where(y == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    design = np.stack([z, np.ones_like(z)], axis=1)  # [n, 2]
    theta = np.array([1.0, 0.0])
    loss = _loss(z, t, *theta)
    for _ in range(MAX_STEPS):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))
        gradient = design.T @ (p - t) / z.size
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design / z.size + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-8:
            candidate = theta - scale * step
            new_loss = _loss(z, t, *candidate)
            if new_loss <= loss - 1e-4 * scale * float(gradient @ step):
                break
            scale /= 2.0
        else:
            break  # no descent left: converged to the float precision
        theta, loss = candidate, new_loss
        if np.abs(scale * step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> tuple[KTCalibration | None, dict]:
    """The calibration of these validation (logits, labels) and its record for the manifest's metrics:
    answers, a, b, ECE and AUC before and after. None (with the record's reason) when it cannot be fitted."""
    z = np.asarray(logits, np.float64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    record: dict = {"method": CALIBRATION_METHOD, "fitted_on": "val", "answers": int(y.size)}
    positives = int(y.sum())
    if y.size < MIN_ANSWERS or min(positives, y.size - positives) < 2:
        return None, record | {"reason": f"too few validation answers ({y.size}, {positives} correct) to fit"}
    if not np.isfinite(z).all():
        return None, record | {"reason": "the head gives non-finite logits on validation"}
    a, b = fit_platt(z, y)
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):
        return None, record | {"reason": f"the fit is not monotone increasing (a = {a:.4g}, b = {b:.4g})"}
    calibration = KTCalibration(a, b)
    before = 0.5 * (1.0 + np.tanh(0.5 * z))
    after = calibration.probabilities(z)
    return calibration, record | {
        "a": a,
        "b": b,
        "val_ece_before": expected_calibration_error(y, before, ECE_BINS),
        "val_ece_after": expected_calibration_error(y, after, ECE_BINS),
        "val_auc_before": auc(y, before),
        "val_auc_after": auc(y, after),
        "val_mean_predicted_before": float(before.mean()),
        "val_mean_predicted_after": float(after.mean()),
        "val_observed_rate": float(y.mean()),
    }


def validation_logits(model: TrainedModel, table: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the checkpoint's validation answers, its data and split rebuilt from its settings, scored
    by its head over `table` (the exported item table). Raises OSError/ValueError when the data cannot be read or
    its catalog is not the checkpoint's."""
    from gramrec.trainer.explicit_settings import explicit_train_settings
    from gramrec.trainer.kt_task import KnowledgeTracingTask

    settings = explicit_train_settings(**(model.config["settings"] | {"progress": False}))
    task = KnowledgeTracingTask(settings)
    if task.items.ids != model.items.ids:
        raise ValueError(f"{settings.data} no longer has the checkpoint's item catalog")
    labels, logits, _ = task.logits(model.head.eval().float(), table.float(), "val")
    return logits, labels


def kt_calibration(model: TrainedModel, table: torch.Tensor) -> tuple[KTCalibration | None, dict]:
    """Fits the export's calibration (see the module docstring); never raises for missing or unusable data."""
    data = Path(str(model.config["settings"].get("data", "")))
    try:
        logits, labels = validation_logits(model, table)
    except (OSError, ValueError) as exc:  # DataFormatError is a ValueError
        calibration, record = None, {"method": CALIBRATION_METHOD, "reason": f"no validation data: {exc}"}
    else:
        calibration, record = fit_calibration(logits, labels)
    if calibration is None:
        log.warning("kt exported without calibration", extra={"data": str(data), "reason": record["reason"]})
    else:
        log.info("kt calibration fitted", extra={k: v for k, v in record.items() if k != "method"})
    return calibration, record
