"""Calibration of the served kt model on CodeWorkout's test students: ECE, spread, reliability PNGs, before/after.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/calibration_kt.py --artifacts artifacts \
        --data ../shared/data/codeworkout_s19 --png bench/figures/kt_reliability.png \
        --png-before bench/figures/kt_reliability_before.png

POST /recommend (kt) ranks questions by how close P(correct) is to a target, so the probabilities must mean what
they say. Each test student's answers (the default split, as training uses it) are predicted one at a time from
the answers before (at most the last 100, as max_seq_len windows in training), with the newest exported kt version
(or --version) through ONNX Runtime. Each answer's head logit is computed once and scored twice: "before" is the
head's own sigmoid (what versions exported without a calibration serve), "after" the version's calibration
(kt_calibration.json, fitted on validation at export; what /predict and /recommend serve). ECE: 20 equal-width
bins (--bins), |mean predicted - observed rate| weighted by the bin's share. Prints JSON.

A first-start kt model to measure (GRAM-1E, one epoch on CodeWorkout; minutes on 2 CPU cores), as `gramrec serve`
trains one:

    .venv/bin/python -c "from pathlib import Path; from gramrec.service.settings import ServiceSettings; \
from gramrec.trainer.bootstrap import train_and_export; \
print(train_and_export(ServiceSettings(artifacts_dir=Path('artifacts/calibration'), redis_url=None), 'kt'))"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 100


def summary(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict:
    """ECE, mean predicted vs observed, AUC, the spread of the predictions and the populated bins."""
    from gramrec.trainer.metrics import auc, expected_calibration_error, reliability_bins

    spread = np.percentile(probabilities, [0, 5, 50, 95, 100])
    return {
        "ece": round(expected_calibration_error(labels, probabilities, bins), 4),
        "mean_predicted": round(float(probabilities.mean()), 4),
        "observed_rate": round(float(labels.mean()), 4),
        "auc": round(auc(labels, probabilities), 4),
        "spread": {k: round(float(v), 4) for k, v in zip(("min", "p5", "median", "p95", "max"), spread, strict=True)},
        "bins": [
            b
            | {
                "bin": [round(e, 2) for e in b["bin"]],
                "mean_predicted": round(b["mean_predicted"], 4),
                "observed": round(b["observed"], 4),
            }
            for b in reliability_bins(labels, probabilities, bins)
        ],
    }


def plot(path: Path, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result["bins"]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="kt model")
    for b in bins:
        axis.annotate(
            str(b["n"]), (b["mean_predicted"], b["observed"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
        )
    axis.set(
        xlabel="predicted P(correct)",
        ylabel="observed rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"{title}, ECE {result['ece']:.3f}",
    )
    axis.title.set_fontsize(9)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--version", default=None, help="the kt version to measure (default: the newest)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "figures" / "kt_reliability.png")
    parser.add_argument("--png-before", type=Path, default=None, help="also plot the uncalibrated probabilities")
    parser.add_argument("--bins", type=int, default=20)
    args = parser.parse_args()

    from gramrec.service.artifact import list_versions
    from gramrec.service.bundle import ModelBundle
    from gramrec.service.kt_scoring import sigmoid
    from gramrec.trainer.kt_data import load_kt_data, split_kt

    version = args.version or next(m["version"] for m in list_versions(args.artifacts) if m["task"] == "kt")
    bundle = ModelBundle.load(args.artifacts, version)
    ids, table = bundle.item_embeddings()
    row = {item_id: i for i, item_id in enumerate(ids)}
    data = load_kt_data(args.data)
    splits = split_kt(data)
    logits, observed = [], []
    for sequence in splits.test:
        rows = np.array([row[data.items.ids[i]] for i in sequence.items])
        for t in range(len(rows)):
            start = max(0, t - WINDOW)
            z = bundle.kt_logits(table[rows[start:t]], sequence.correct[start:t], table[rows[t : t + 1]])
            logits.append(float(z[0]))
            observed.append(int(sequence.correct[t]))
    z, y = np.array(logits, np.float32), np.array(observed)
    before = summary(y, sigmoid(z.astype(np.float64)), args.bins)
    after = summary(y, bundle.kt_calibration.probabilities(z).astype(np.float64), args.bins)
    report = {
        "version": version,
        "calibration": bundle.kt_calibration.to_dict(),
        "answers": len(y),
        "students": len(splits.test),
        "before": before,
        "after": after,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    name = "CodeWorkout test students"
    plot(args.png, after, f"{name}, calibrated (served)")
    if args.png_before is not None:
        plot(args.png_before, before, f"{name}, uncalibrated")
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
