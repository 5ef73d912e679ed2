"""Calibration of the served kt model on CodeWorkout's test students: expected calibration error, reliability PNG.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/calibration_kt.py --artifacts artifacts \
        --data ../shared/data/codeworkout_s19 --png bench/figures/kt_reliability.png

POST /recommend (kt) ranks questions by how close P(correct) is to a target, so the probabilities must mean what
they say. Each test student's answers (the default split, as training uses it) are predicted one at a time from
the answers before (at most the last 100, as max_seq_len windows in training), with the newest exported kt version through ONNX
Runtime. ECE: 20 equal-width bins (--bins), |mean predicted - observed rate| weighted by the bin's share. Prints JSON.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "figures" / "kt_reliability.png")
    parser.add_argument("--bins", type=int, default=20)
    args = parser.parse_args()

    from gramrec.service.artifact import list_versions
    from gramrec.service.bundle import ModelBundle
    from gramrec.trainer.kt_data import load_kt_data, split_kt

    version = next(m["version"] for m in list_versions(args.artifacts) if m["task"] == "kt")
    bundle = ModelBundle.load(args.artifacts, version)
    ids, table = bundle.item_embeddings()
    row = {item_id: i for i, item_id in enumerate(ids)}
    data = load_kt_data(args.data)
    splits = split_kt(data)
    predicted, observed = [], []
    for sequence in splits.test:
        rows = np.array([row[data.items.ids[i]] for i in sequence.items])
        for t in range(len(rows)):
            start = max(0, t - WINDOW)
            p = bundle.predict_kt(table[rows[start:t]], sequence.correct[start:t], table[rows[t : t + 1]])
            predicted.append(float(p[0]))
            observed.append(int(sequence.correct[t]))
    p, y = np.array(predicted), np.array(observed)
    edges = np.linspace(0, 1, args.bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, args.bins - 1)
    bins = []
    ece = 0.0
    for b in range(args.bins):
        mask = which == b
        if not mask.any():
            continue
        confidence, accuracy = float(p[mask].mean()), float(y[mask].mean())
        ece += mask.mean() * abs(confidence - accuracy)
        bins.append(
            {
                "bin": [round(edges[b], 2), round(edges[b + 1], 2)],
                "n": int(mask.sum()),
                "mean_predicted": round(confidence, 4),
                "observed": round(accuracy, 4),
            }
        )
    report = {
        "version": version,
        "answers": len(p),
        "students": len(splits.test),
        "ece": round(float(ece), 4),
        "mean_predicted": round(float(p.mean()), 4),
        "observed_rate": round(float(y.mean()), 4),
        "bins": bins,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        title=f"CodeWorkout test students, ECE {ece:.3f}",
    )
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.png, dpi=120)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
