"""Results table of every training strategy on both real datasets, same seeds and budget.

    python bench/strategy_table.py --data-root ../shared/data [--encoder-dir DIR] [--epochs 5] [--out bench/results]

Prints a markdown table (the one in BENCHMARKS.md) and writes every run's full report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STRATEGIES = [
    ("e2e", "1e"),
    ("gram", "1s"),
    ("gram", "10s"),
    ("gram", "0.5e"),
    ("gram", "1e"),
    ("nofinetune", "1e"),
    ("nocontent", "1e"),
]
DATASETS = {"kt": "codeworkout_s19", "nr": "mind_small_subset"}


def run_all(args: argparse.Namespace) -> list[dict]:
    from gramrec.trainer.logs import configure_logging
    from gramrec.trainer.settings import TrainSettings
    from gramrec.trainer.train import train

    configure_logging()
    results = []
    for task in args.tasks:
        for strategy, period in STRATEGIES:
            label = strategy if strategy != "gram" else f"gram-{period}"
            out = Path(args.out) / f"{task}-{label}"
            settings = TrainSettings(
                task=task, data=Path(args.data_root) / DATASETS[task], strategy=strategy, period=period,
                epochs=args.epochs, patience=args.patience, seed=args.seed, out=out, progress=False,
                encoder_dir=args.encoder_dir, encoder_batch_size=args.encoder_batch_size,
            )
            started = time.perf_counter()
            report = train(settings)
            report["process_wall_s"] = time.perf_counter() - started
            print(json.dumps({"task": task, "strategy": label, "metrics": report["metrics"],
                              "time_to_best_s": report["time_to_best_s"]}), flush=True)
            results.append(report)
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    lines = []
    for task in ("kt", "nr"):
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        if task == "kt":
            lines += ["| strategy | test AUC | cold-start AUC | best val AUC | time to best (s) | wall (s) | "
                      "encoder fwd items | encoder bwd items | epochs | peak mem (GiB) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| strategy | test AUC | MRR | nDCG@5 | nDCG@10 | best val AUC | time to best (s) | wall (s) | "
                      "encoder fwd items | encoder bwd items | epochs | peak mem (GiB) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["metrics"]
            metric_cells = ([fmt(m["auc"]), fmt(m["cold_auc"])] if task == "kt"
                            else [fmt(m["auc"]), fmt(m["mrr"]), fmt(m["ndcg@5"]), fmt(m["ndcg@10"])])
            cells = [r["strategy"], *metric_cells, fmt(r["best_val"]), fmt(r["time_to_best_s"], 1),
                     fmt(r["wall_time_s"], 1), f"{r['encoder_items_forward']:,}", f"{r['encoder_items_backward']:,}",
                     str(r["epochs_run"]), fmt(r["peak_memory_bytes"] / 2**30, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--encoder-dir", default=None)
    parser.add_argument("--tasks", nargs="+", default=["kt", "nr"], choices=["kt", "nr"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-batch-size", type=int, default=256)
    parser.add_argument("--out", default="bench/results/strategies")
    parser.add_argument("--from-json", help="only print the table of an earlier results.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run_all(args)
    print(table(results))


if __name__ == "__main__":
    main()
