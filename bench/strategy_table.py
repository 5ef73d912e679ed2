"""Every training strategy on both real datasets, paired over seeds, same budget: the quality table.

    python bench/strategy_table.py --data-root ../shared/data [--encoder-dir DIR] [--seeds 0 1 2 3] [--jobs 6]
        [--strategies e2e gram-1s gram-10s gram-0.5e gram-1e nofinetune] [--variant NAME:key=value,...]
        [--epochs 5 | --epochs kt=5 nr=3] [--out bench/results/strategies]

Each (task, strategy, seed) is one `trainer.train.train` run in its own process (`--jobs` at a time: on a GPU the
small runs are launch-bound, so several share it well; their wall times are then comparable only within one
call). `--variant t8:table_lr=8,regress_lr=3e-4` adds a multi-step GRAM run with those settings (period 1e unless
given), for sweeps; any TrainSettings field, e.g. `--variant b128:batch_size=128,cf_lr_scaling=sqrt` (a larger CF
batch with the learning-rate rule; the table's "time to best" column is per label, variants included). Test metrics are also recorded after every epoch, for the early-stopping check only: selection
is always on validation.

Prints, per task: each strategy's test metric per seed, the mean, the spread (max - min), the paired mean gain over
NoFinetune and its share of E2E's gain, time to best, encoder movement after epoch 1, and the multi-step
regressions' diagnostics. Writes every report as JSON and a plot of validation metric against time (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"kt": "codeworkout_s19", "nr": "mind_small_subset"}
STRATEGIES = {
    "e2e": {"strategy": "e2e"},
    "gram-1s": {"strategy": "gram", "period": "1s"},
    "gram-10s": {"strategy": "gram", "period": "10s"},
    "gram-0.5e": {"strategy": "gram", "period": "0.5e"},
    "gram-1e": {"strategy": "gram", "period": "1e"},
    "nofinetune": {"strategy": "nofinetune"},
    "nocontent": {"strategy": "nocontent"},
}
DEFAULT_STRATEGIES = ["e2e", "gram-1s", "gram-10s", "gram-0.5e", "gram-1e", "nofinetune"]


def parse_epochs(values: list[str]) -> dict[str, int]:
    """['5'] -> {'kt': 5, 'nr': 5}; ['kt=5', 'nr=2'] -> per task (a task not named keeps a bare number, else 5)."""
    bare = [int(v) for v in values if "=" not in v]
    out = dict.fromkeys(DATASETS, bare[-1] if bare else 5)
    for value in values:
        if "=" in value:
            task, _, number = value.partition("=")
            if task not in DATASETS:
                raise SystemExit(f"--epochs: unknown task {task!r} (kt, nr)")
            out[task] = int(number)
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """'t8:table_lr=8,period=0.5e' -> ('t8', {'strategy': 'gram', 'period': '0.5e', 'table_lr': '8'})"""
    name, _, pairs = text.partition(":")
    settings = {"strategy": "gram", "period": "1e"}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        settings[key.strip()] = value.strip()
    return name, settings


# -- one run (a child process) ------------------------------------------------------------------------------------
def run_one(spec: dict) -> None:
    """Trains one configuration; test metrics after every epoch go to the report (diagnosis only)."""
    from gramrec.trainer.logs import configure_logging
    from gramrec.trainer.settings import TrainSettings
    from gramrec.trainer.train import evaluate, train

    configure_logging(spec.get("log_level", "WARNING"))
    test_by_epoch = []
    report = train(TrainSettings(**spec["settings"]),
                   on_epoch=lambda run, epoch: test_by_epoch.append(evaluate(run, "test")))
    report["test_by_epoch"] = test_by_epoch
    report["label"], report["seed"] = spec["label"], spec["settings"]["seed"]
    Path(spec["report"]).write_text(json.dumps(report, indent=2, default=float))


def launch(spec: dict, out: Path) -> dict:
    path = Path(spec["report"])
    if path.exists():  # a finished run is kept: a second call resumes the table
        return json.loads(path.read_text())
    started = time.perf_counter()
    log = out / f"{path.stem}.log"
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, __file__, "--one", json.dumps(spec)], stdout=handle,
                               stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0 or not path.exists():
        print(f"FAILED {path.stem} (exit {code}), see {log}", flush=True)
        return {"label": spec["label"], "task": spec["settings"]["task"], "seed": spec["settings"]["seed"],
                "failed": True}
    report = json.loads(path.read_text())
    print(json.dumps({"run": path.stem, "test": report["metrics"].get("auc"), "best_val": report["best_val"],
                      "time_to_best_s": report["time_to_best_s"], "process_s": round(time.perf_counter() - started, 1)}),
          flush=True)
    return report


def specs(args) -> list[dict]:
    configs = {name: STRATEGIES[name] for name in args.strategies}
    configs |= dict(parse_variant(v) for v in args.variant)
    out = []
    for task in args.tasks:
        for seed in args.seeds:
            for label, config in configs.items():
                settings = {"task": task, "data": str(Path(args.data_root) / DATASETS[task]), "epochs": args.epochs[task],
                            "patience": args.patience, "seed": seed, "progress": False,
                            "out": str(Path(args.out) / "runs" / f"{task}-{label}-s{seed}"), **config}
                if args.encoder_dir:
                    settings["encoder_dir"] = args.encoder_dir
                out.append({"label": label, "settings": settings,
                            "report": str(Path(args.out) / f"{task}-{label}-s{seed}.json")})
    return out


# -- the table -----------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(results: list[dict]) -> str:
    lines = []
    for task in ("kt", "nr"):
        rows = [r for r in results if r.get("task") == task and not r.get("failed")]
        if not rows:
            continue
        labels = list(dict.fromkeys(r["label"] for r in rows))
        seeds = sorted({r["seed"] for r in rows})
        by = {(r["label"], r["seed"]): r for r in rows}

        def auc(label, seed):
            r = by.get((label, seed))
            return r["metrics"]["auc"] if r else None

        def paired_gain(label, base="nofinetune"):
            pairs = [auc(label, s) - auc(base, s) for s in seeds if auc(label, s) is not None and auc(base, s) is not None]
            return sum(pairs) / len(pairs) if pairs else None

        e2e_gain = paired_gain("e2e")
        lines += [f"### {task}: test AUC per seed ({', '.join(map(str, seeds))})", "",
                  "| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread | gain over "
                  "NoFinetune (paired, pt) | share of E2E's gain | time to best (s) | encoder change after epoch 1 | "
                  "best epoch |",
                  "|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|---|"]
        for label in labels:
            values = [auc(label, s) for s in seeds]
            present = [v for v in values if v is not None]
            runs = [by[(label, s)] for s in seeds if (label, s) in by]
            gain = paired_gain(label)
            share = gain / e2e_gain if gain is not None and e2e_gain else None
            ttb = [r["time_to_best_s"] for r in runs if r["time_to_best_s"] is not None]
            change = [r["history"][0].get("encoder_change", 0.0) for r in runs if r["history"]]
            epochs = [str(r["best_epoch"] + 1) if r["best_epoch"] is not None else "-" for r in runs]
            cells = [label, *[fmt(v) for v in values], fmt(sum(present) / len(present)),
                     fmt(max(present) - min(present)), fmt(None if gain is None else 100 * gain, 2),
                     fmt(share, 2), fmt(sum(ttb) / len(ttb) if ttb else None, 1),
                     f"{sum(change) / len(change):.2e}" if change else "-", "/".join(epochs)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", regression_table(rows), early_stopping_table(rows)]
    return "\n".join(lines)


def regression_table(rows: list[dict]) -> str:
    """Mean diagnostics of every multi-step regression of every seed (first epoch and all)."""
    lines = ["| strategy | regressions | passes | steps | fit (touched) | toward | cosine | untouched move | "
             "param change | s each | stopped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        regs = [g for r in rows if r["label"] == label for h in r["history"] for g in h.get("regressions", [])]
        if not regs:
            continue

        def mean(key):
            return sum(g[key] for g in regs) / len(regs)

        stops = {s: sum(g["stopped"] == s for g in regs) for s in ("fit", "passes", "time")}
        lines.append(f"| {label} | {len(regs)} | {mean('passes'):.1f} | {mean('steps'):.0f} | {mean('fit'):.3f} | "
                     f"{mean('toward'):.3f} | {mean('cosine'):.3f} | {mean('untouched_move'):.3f} | "
                     f"{mean('param_change'):.2e} | {mean('seconds'):.2f} | "
                     + ", ".join(f"{k} {v}" for k, v in stops.items() if v) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def early_stopping_table(rows: list[dict]) -> str:
    """Does the validation-best epoch also score best on test? (Test per epoch is recorded, never selected on.)"""
    lines = ["| strategy | val-best epoch per seed | test-best epoch per seed | test AUC lost by selecting on val (pt, mean) |",
             "|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label and r.get("test_by_epoch")]
        if not runs:
            continue
        val_best, test_best, lost = [], [], []
        for r in runs:
            tests = [t["auc"] for t in r["test_by_epoch"]]
            vals = [h["val"]["auc"] for h in r["history"]]
            v, t = vals.index(max(vals)), tests.index(max(tests))
            val_best.append(str(v + 1)), test_best.append(str(t + 1)), lost.append(tests[t] - tests[v])
        lines.append(f"| {label} | {'/'.join(val_best)} | {'/'.join(test_best)} | {100 * sum(lost) / len(lost):.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = [t for t in ("kt", "nr") if any(r.get("task") == t and not r.get("failed") for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        seed = min(r["seed"] for r in results if r.get("task") == task and not r.get("failed"))
        for r in results:
            if r.get("task") == task and r.get("seed") == seed and not r.get("failed"):
                ax.plot([h["elapsed_s"] for h in r["history"]], [h["val"]["auc"] for h in r["history"]], "o-",
                        label=r["label"])
        ax.set_xscale("log")
        ax.set(title=f"{task}: validation AUC against training time (seed {seed})", xlabel="seconds (log)",
               ylabel="validation AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder-dir", default=None)
    parser.add_argument("--tasks", nargs="+", default=["kt", "nr"], choices=["kt", "nr"])
    parser.add_argument("--strategies", nargs="*", default=DEFAULT_STRATEGIES, choices=list(STRATEGIES))
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (a GRAM sweep point)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--epochs", nargs="+", default=["5"], help="5, or per task: kt=5 nr=3")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "strategies"))
    parser.add_argument("--from-dir", help="only print the table of the reports in an earlier --out")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.epochs = parse_epochs(args.epochs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        run_one(json.loads(args.one))
        return
    out = Path(args.from_dir or args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_dir:
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "results.json"]
    else:
        todo = specs(args)
        # Longest first, so the slow E2E runs do not start last and set the wall time alone.
        todo.sort(key=lambda s: (s["settings"]["strategy"] != "e2e", s["label"] != "gram-1s"))
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda spec: launch(spec, out), todo))
        for r in results:  # drop bulky fields from the combined file
            r.pop("settings", None)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(summary(results))
    plot(results, out / "val_vs_time.png")


if __name__ == "__main__":
    main()
