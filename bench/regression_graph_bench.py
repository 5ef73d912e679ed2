"""Multi-step GRAM's regression with its encoder calls replayed as CUDA graphs, against the eager calls.

Issue #11 measured the regression as bound by calls, not work: a pass of 256-title steps ran at 12,200 rows/s
against the encoder's 71,000+ rows/s floor, each call costing ~20 ms of launches, autocast casts and autograd
Python (BENCHMARKS.md §3). trainer/encoder_graphs.py captures each padded (rows, width) shape once. Per workload
this bench builds a real GRAM-1E situation (the bench workload, a CF epoch moving the table, the regression held
back) and from that one start:

  * checks one regression step's gradient three ways on the same batch: the eager reference call, the padded
    call run eagerly, and the padded call replayed from its graph (graph vs its own eager body: the capture is
    right; padded vs reference: bf16 rounding of other GEMM shapes);
  * runs the whole regression (the configured passes, checks and line search) eagerly, graphed from cold
    (captures inside) and graphed again (graphs warm), timing each, with its report and peak memory.

    python bench/regression_graph_bench.py --smoke --device cpu                       # tiny CPU run (tests)
    python bench/regression_graph_bench.py --workloads mind-title nr-mind --encoder-dir DIR --data-root DIR

Results: `--out` (default $OUT, else bench/results/regression_graph)/regression_graph.json, rewritten per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench import train_bench
from gramrec.trainer.encoder_graphs import GraphedPseudoLoss
from gramrec.trainer.regression import _accumulate_gradients
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import train_step

say = train_bench.say


def build(name: str, args, bench_args, device: torch.device):
    """GRAM-1E after `--max-steps` CF steps (default: one epoch) with the regression held back."""
    source = train_bench.EncoderSource(bench_args, device)
    tokenizer_dir = Path(args.encoder_dir) if args.encoder_dir else None
    workload = train_bench.build_workload(name, bench_args, source, tokenizer_dir, device)
    run, _ = train_bench.build_run(workload, "gram-1e", source, device)
    strategy = run.strategy
    assert isinstance(strategy, GramMultiStep)
    strategy.period_steps = 1 << 62
    batches = workload.epoch_batches(0)[: args.max_steps or None]
    steps = run.static_step.prepare(batches) if run.static_step is not None else batches
    for batch in steps:
        train_step(run, batch)
    train_bench.sync(device)
    return workload, strategy


def snapshot(strategy: GramMultiStep) -> dict:
    return {"encoder": {k: v.detach().clone() for k, v in strategy.encoder.state_dict().items()},
            "table": strategy.table.clone(), "encoded": strategy.encoded.clone(), "touched": strategy.touched.clone(),
            "row_version": strategy.row_version.clone(), "encoder_version": strategy.encoder_version,
            "regress_lr": strategy.regress_lr, "generator": strategy._generator.get_state()}


def restore(strategy: GramMultiStep, saved: dict) -> None:
    strategy.encoder.load_state_dict(saved["encoder"])
    for name in ("table", "encoded", "touched", "row_version"):
        getattr(strategy, name).copy_(saved[name])
    strategy.encoder_version, strategy.regress_lr = saved["encoder_version"], saved["regress_lr"]
    strategy._generator.set_state(saved["generator"])
    strategy.optimizers["encoder"][0].state.clear()
    strategy.optimizers["encoder"][0].zero_grad(set_to_none=True)


def step_gradients(strategy: GramMultiStep, device: torch.device) -> dict:
    """One regression batch's gradient: reference call, padded call eager, padded call replayed."""
    encoder, tokens = strategy.encoder, strategy.tokens
    encoder.eval()
    touched = strategy.touched.nonzero().squeeze(1).cpu()
    rows = touched[torch.randperm(len(touched), generator=torch.Generator().manual_seed(0))[: strategy.settings.regress_batch_size]]
    rows = rows[torch.argsort(tokens.lengths[rows], stable=True)]
    targets = strategy.table[rows.to(device)]
    params = [p for p in encoder.parameters() if p.requires_grad]
    plan = strategy._plan()

    def grads_of(call) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        call()
        out = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        return out

    reference = grads_of(lambda: _accumulate_gradients(encoder, tokens, rows, targets, plan))
    eager_padded = GraphedPseudoLoss(encoder)
    eager_padded.capture = False
    padded = grads_of(lambda: eager_padded.accumulate(tokens, rows, targets))
    graphs = GraphedPseudoLoss(encoder)
    replayed = []
    times = []
    for _ in range(6):  # 2 warm-up calls, the capture + first replay, then replays
        t = train_bench.now(device)
        replayed = grads_of(lambda: graphs.accumulate(tokens, rows, targets))
        times.append(train_bench.now(device) - t)
    t = train_bench.now(device)
    for _ in range(5):
        grads_of(lambda: _accumulate_gradients(encoder, tokens, rows, targets, plan))
    eager_s = (train_bench.now(device) - t) / 5

    def relative(a, b) -> float:
        return float(torch.stack([(x - y).double().norm() for x, y in zip(a, b)]).norm()
                     / torch.stack([y.double().norm() for y in b]).norm())

    return {"rows": len(rows), "width": int(tokens.lengths[rows[-1]]), "captures": graphs.captures,
            "capture_error": graphs.capture_error,
            "replayed_vs_padded_eager": relative(replayed, padded), "padded_vs_reference": relative(padded, reference),
            "replayed_vs_reference": relative(replayed, reference),
            "eager_call_ms": eager_s * 1e3, "replayed_call_ms": min(times[3:]) * 1e3,
            "calls_ms": [t * 1e3 for t in times]}


def timed_regression(strategy: GramMultiStep, saved: dict, graphs: GraphedPseudoLoss | None, device) -> dict:
    restore(strategy, saved)
    strategy.regress_graphs = graphs
    captures = graphs.captures if graphs else 0
    train_bench.reset_memory(device)
    t = train_bench.now(device)
    report = strategy.regress()
    seconds = train_bench.now(device) - t
    assert report is not None
    return {"seconds": seconds, "ms_per_step": seconds / max(report.steps, 1) * 1e3,
            "rows_per_s": report.rows * report.passes / max(seconds, 1e-9),
            "captures": (graphs.captures - captures) if graphs else 0, "capture_s": graphs.capture_s if graphs else 0.0,
            "replays": graphs.replays if graphs else 0, "capture_error": graphs.capture_error if graphs else None,
            "peak_memory_gib": (train_bench.peak_memory(device) or 0) / 2**30, "report": report.as_dict()}


def run_workload(name: str, args, bench_args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    workload, strategy = build(name, args, bench_args, device)
    record: dict = {"touched": int(strategy.touched.sum()), "cf_s": time.perf_counter() - t0}
    saved = snapshot(strategy)
    record["step"] = step_gradients(strategy, device)
    s = record["step"]
    say(f"{name}: one step ({s['rows']} rows, longest {s['width']} tokens): eager {s['eager_call_ms']:.1f} ms, replayed "
        f"{s['replayed_call_ms']:.1f} ms; gradient difference replayed vs padded eager {s['replayed_vs_padded_eager']:.1e}, "
        f"padded vs reference {s['padded_vs_reference']:.1e}" + (f"; CAPTURE FAILED {s['capture_error']}" if s["capture_error"] else ""))
    graphs = GraphedPseudoLoss(strategy.encoder)
    for label, use in (("eager", None), ("graphed-cold", graphs), ("graphed-warm", graphs)):
        r = record[label] = timed_regression(strategy, saved, use, device)
        rep = r["report"]
        say(f"{name} regression {label}: {r['seconds']:.2f} s, {rep['steps']} steps ({r['ms_per_step']:.1f} ms each), "
            f"{rep['passes']} passes ({rep['rejected']} rejected), fit {rep['fit']:.4f}, {r['rows_per_s']:,.0f} rows/s, "
            f"{r['captures']} captures, peak {r['peak_memory_gib']:.2f} GiB")
    restore(strategy, saved)
    return record


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=train_bench.ALL_WORKLOADS, default=["mind-title"])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="CF steps before the regression (default: epoch)")
    parser.add_argument("--regress-max-passes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "regression_graph"))
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder and data on CPU (tests)")
    args = parser.parse_args(argv)
    bench_argv = ["--data-root", args.data_root, "--seed", str(args.seed),
                  *(["--regress-max-passes", str(args.regress_max_passes)] if args.regress_max_passes else []),
                  *(["--encoder-dir", args.encoder_dir] if args.encoder_dir else []), *(["--smoke"] if args.smoke else [])]
    bench_args = train_bench.parse_args(bench_argv)
    if args.smoke:
        args.max_steps = args.max_steps or 3
    return args, bench_args


def main(argv: list[str] | None = None) -> dict:
    args, bench_args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": {"argv": list(sys.argv[1:] if argv is None else argv), "device": str(device),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                     "workloads": {}}
    for name in args.workloads:
        results["workloads"][name] = run_workload(name, args, bench_args, device)
        (out / "regression_graph.json").write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
