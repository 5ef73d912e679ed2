"""Why multi-step GRAM's regression passes are rejected: one pass from the same start under controlled variants.

BENCHMARKS.md §3 (issue #11) saw every regression pass of GRAM-1E undone on mind-title and toeic (pseudo-loss
"not lowered", fit 0.0) and half of them on nr-mind. Two different things can produce that verdict:

  * the pass really raised the pseudo-loss 0.5 * sum ||row - CE(c)||^2 (steps too large or too noisy for the
    targets' small moves: optimizer, learning rate, batch size, dropout mismatch), or
  * the measurement cannot see the change (the bf16 encodings that measure the loss differ from run to run by
    more than the pass moved them).

This probe builds a real GRAM-1E situation with the project's own classes (the bench workload, GramMultiStep,
a CF epoch moving the table as the trainer does, with the end-of-epoch regression held back), snapshots the
encoder, and then from that SAME start (same weights, same targets, same shuffled batches) runs one regression
pass per variant and measures the pseudo-loss before and after, both with the trainer's measurement (eval,
bf16 autocast on CUDA, encoder batches) and in float32. It also reports the measurement's noise floor (other
batchings, float32 vs bf16, the table's own encodings, dropout on), the targets' move ||row - CE|| / ||CE||, and
the size of one optimizer step (parameters, and encodings relative to the wanted move).

    python bench/regression_probe.py --smoke --device cpu                          # tiny CPU run (tests)
    python bench/regression_probe.py --workloads mind-title nr-mind --encoder-dir DIR --data-root DIR
        [--max-rows 32768] [--time-budget-s 120]                                    (one line)

Results go to `--out` (default $OUT, else bench/results/regression_probe): regression_probe.json (rewritten after
every variant, so a run cut short still leaves its numbers) and regression_probe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench import train_bench
from gramrec.models.content_encoder import ContentEncoder, ItemTokens, batch_bounds
from gramrec.trainer.distributed import SINGLE
from gramrec.trainer.regression import _shuffled_chunks
from gramrec.trainer.strategies import GramMultiStep, make_optimizer
from gramrec.trainer.train import train_step


@dataclass(frozen=True)
class Variant:
    """One regression pass's configuration; every field not named keeps the trainer's."""

    name: str
    optimizer: str = "adam"  # "adam" (the trainer's, fresh state), "adam-carried" (state of an earlier pass), "sgd"
    lr_factor: float = 1.0  # times the configured regress_lr (for SGD: the lr itself is sgd_lr * lr_factor)
    autocast: bool = True  # bf16 autocast in the regression's forward+backward (CUDA only)
    batch_items: int | None = None  # None: the configured regress_batch_size
    train_mode: bool = False  # dropout on during the pass (the table's encodings are eval-mode)


def variants(sgd_lr: float) -> list[Variant]:
    return [
        Variant("as configured (Adam, fresh state)"),
        Variant("Adam, state carried from an earlier pass", optimizer="adam-carried"),
        Variant("lr / 4", lr_factor=0.25),
        Variant("lr / 16", lr_factor=1 / 16),
        Variant("lr / 64", lr_factor=1 / 64),
        Variant("lr / 256", lr_factor=1 / 256),
        Variant("lr / 1024", lr_factor=1 / 1024),
        Variant("lr x 4", lr_factor=4.0),
        Variant(f"SGD lr {sgd_lr:g}", optimizer="sgd", lr_factor=1.0),
        Variant(f"SGD lr {sgd_lr * 10:g}", optimizer="sgd", lr_factor=10.0),
        Variant(f"SGD lr {sgd_lr * 100:g}", optimizer="sgd", lr_factor=100.0),
        Variant("float32 forward (no autocast)", autocast=False),
        Variant("batch 1024", batch_items=1024),
        Variant("dropout on (train mode)", train_mode=True),
    ]


# ---------------------------------------------------------------------------------------------------------
# The situation: a GRAM-1E epoch's table, the regression held back


@dataclass
class Situation:
    encoder: ContentEncoder
    tokens: ItemTokens
    items: torch.Tensor  # [K] (CPU) touched items regressed onto
    targets: torch.Tensor  # [K, D] their rows after the CF epoch
    table_encoded: torch.Tensor  # [K, D] their encodings as the table holds them (initial whole-table encode)
    start: dict[str, torch.Tensor]  # the encoder's parameters at the start
    lr: float
    batch_items: int
    micro_items: int
    info: dict


def build_situation(name: str, args, bench_args, device: torch.device) -> Situation:
    """A GRAM-1E run of the bench workload `name`: CF steps over one epoch (or --max-steps), no regression."""
    source = train_bench.EncoderSource(bench_args, device)
    tokenizer_dir = Path(args.encoder_dir) if args.encoder_dir else None
    workload = train_bench.build_workload(name, bench_args, source, tokenizer_dir, device)
    run, _ = train_bench.build_run(workload, "gram-1e", source, device)
    strategy = run.strategy
    assert isinstance(strategy, GramMultiStep)
    strategy.period_steps = 1 << 62  # hold the regression back: the probe runs it
    batches = workload.epoch_batches(0)[: args.max_steps or None]
    started = time.perf_counter()
    for batch in batches:
        train_step(run, batch)
    cf_s = time.perf_counter() - started
    touched = strategy.touched.nonzero().squeeze(1).cpu()
    generator = torch.Generator().manual_seed(args.seed)
    items = touched[torch.randperm(len(touched), generator=generator)[: args.max_rows]] if args.max_rows else touched
    items = items.sort().values
    settings = strategy.settings
    encoder = strategy.encoder
    return Situation(
        encoder=encoder,
        tokens=workload.tokens,
        items=items,
        targets=strategy.table[items.to(device)].clone(),
        table_encoded=strategy.encoded[items.to(device)].clone(),
        start={k: v.detach().clone() for k, v in encoder.state_dict().items()},
        lr=float(settings.regress_lr or 0.0),
        batch_items=settings.regress_batch_size,
        micro_items=settings.encoder_batch_size,
        info={"workload": name, "cf_steps": len(batches), "cf_s": cf_s, "touched": len(touched), "rows": len(items),
              "table_lr": settings.table_lr, "batch_size": settings.batch_size, "regress_lr": settings.regress_lr,
              "regress_batch_size": settings.regress_batch_size, "encoder_batch_size": settings.encoder_batch_size},
    )


# ---------------------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def measure(encoder: ContentEncoder, tokens: ItemTokens, items: torch.Tensor, batch: int, autocast: bool,
            train_mode: bool = False) -> torch.Tensor:
    """[K, D] encodings, as the trainer's measurement takes them (eval mode unless train_mode)."""
    was = encoder.training
    encoder.train(train_mode)
    out = encoder.encode(tokens, items, batch, autocast=autocast)
    encoder.train(was)
    return out


def pseudo_loss(targets: torch.Tensor, encoded: torch.Tensor) -> float:
    return float(0.5 * (targets.double() - encoded.double()).pow(2).sum())


def target_moves(s: Situation) -> dict:
    """How far the CF epoch moved the rows from their encodings, relative to the encodings' size."""
    wanted = (s.targets - s.table_encoded).norm(dim=1)
    size = s.table_encoded.norm(dim=1).clamp_min(1e-30)
    relative = wanted / size
    return {"move_over_norm_mean": float(relative.mean()), "move_over_norm_median": float(relative.median()),
            "move_over_norm_max": float(relative.max()), "move_mean": float(wanted.mean()),
            "encoding_norm_mean": float(size.mean()), "unmoved_rows": int((wanted == 0).sum())}


def noise_floor(s: Situation, micro_alt: int) -> dict:
    """The same encoder on the same items, measured in other ways: how much the measurement itself moves the
    encodings (relative to the wanted move) and the pseudo-loss (relative to the loss)."""
    reference = measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=True)
    loss_ref = pseudo_loss(s.targets, reference)
    wanted = float((s.targets - reference).norm())
    others = {
        f"other batching ({micro_alt} items)": measure(s.encoder, s.tokens, s.items, micro_alt, autocast=True),
        "the table's encodings (whole-table encode)": s.table_encoded,
        "float32 (no autocast)": measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=False),
        "repeat, same batching": measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=True),
        "dropout on (train mode)": measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=True,
                                           train_mode=True),
    }
    rows = {}
    for name, other in others.items():
        rows[name] = {"encoding_diff_over_wanted": float((other - reference).norm()) / max(wanted, 1e-30),
                      "loss_diff_over_loss": (pseudo_loss(s.targets, other) - loss_ref) / max(loss_ref, 1e-30)}
    return {"reference": "eval, bf16 autocast on CUDA, encoder batches", "loss": loss_ref,
            "wanted_norm": wanted, "against": rows}


# ---------------------------------------------------------------------------------------------------------
# One regression pass


def restore(s: Situation) -> None:
    s.encoder.load_state_dict(s.start)


def trained(encoder: ContentEncoder) -> list[torch.nn.Parameter]:
    return [p for p in encoder.parameters() if p.requires_grad]


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def new_optimizer(s: Situation, v: Variant, sgd_lr: float, device: torch.device) -> torch.optim.Optimizer:
    kind = "sgd" if v.optimizer == "sgd" else "adam"
    lr = sgd_lr * v.lr_factor if kind == "sgd" else s.lr * v.lr_factor
    optimizer, _ = make_optimizer(kind, trained(s.encoder), lr, 0, device)  # the strategy's own optimizer
    return optimizer


def accumulate(s: Situation, chunk: torch.Tensor, targets: torch.Tensor, autocast: bool) -> None:
    """regression._accumulate_gradients, with the autocast switch exposed."""
    device = targets.device
    packed = s.encoder.uses_packed(device, autocast=autocast)
    for lo, hi in batch_bounds(s.tokens.lengths[chunk], s.micro_items, s.encoder.batch_tokens, packed):
        predicted = s.encoder.encode(s.tokens, chunk[lo:hi], s.micro_items, autocast=autocast)
        (0.5 * (predicted - targets[lo:hi]).pow(2).sum()).backward()


def one_pass(s: Situation, v: Variant, optimizer: torch.optim.Optimizer, seed: int,
             probe_rows: torch.Tensor | None = None) -> dict:
    """One pass over the rows in shuffled batches (the regression's own batching); after its first step, the
    step's size: parameters, and the probe rows' float32 encodings against their wanted move."""
    s.encoder.train(v.train_mode)
    params = trained(s.encoder)
    first: dict = {}
    before = flat(params) if probe_rows is not None else None
    if probe_rows is not None:
        probe_before = measure(s.encoder, s.tokens, s.items[probe_rows], s.micro_items, autocast=False)
    steps = 0
    generator = torch.Generator().manual_seed(seed)
    for rows in _shuffled_chunks(s.items, s.tokens, v.batch_items or s.batch_items, generator, SINGLE):
        accumulate(s, s.items[rows], s.targets[rows.to(s.targets.device)], v.autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps == 1 and probe_rows is not None:
            assert before is not None
            after_one = measure(s.encoder, s.tokens, s.items[probe_rows], s.micro_items, autocast=False)
            wanted = (s.targets[probe_rows.to(s.targets.device)] - probe_before).norm(dim=1).mean()
            first = {"step_param_change": float((flat(params) - before).norm() / before.norm()),
                     "step_encoding_move_over_wanted": float((after_one - probe_before).norm(dim=1).mean() / wanted)}
    s.encoder.eval()
    return {"steps": steps, **first}


def run_variant(s: Situation, v: Variant, args, device: torch.device, before: dict[str, torch.Tensor]) -> dict:
    restore(s)
    optimizer = new_optimizer(s, v, args.sgd_lr, device)
    if v.optimizer == "adam-carried":  # Adam's moments from one earlier pass over the same rows, then the start
        one_pass(s, Variant("warm"), optimizer, args.seed + 1)
        restore(s)
    start = flat(trained(s.encoder))
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed + 2)
    probe_rows = torch.randperm(len(s.items), generator=generator)[: args.probe_rows]
    result = one_pass(s, v, optimizer, args.seed, probe_rows)
    result["seconds"] = time.perf_counter() - started
    result["param_change"] = float((flat(trained(s.encoder)) - start).norm() / start.norm())
    for label, autocast in (("bf16", True), ("fp32", False)):
        if label == "bf16" and device.type != "cuda":
            continue  # no autocast on the CPU: the two measurements are one
        after = measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=autocast)
        loss_before, loss_after = pseudo_loss(s.targets, before[label]), pseudo_loss(s.targets, after)
        wanted, made = s.targets - before[label], after - before[label]
        result[label] = {
            "loss_before": loss_before, "loss_after": loss_after,
            "change": (loss_after - loss_before) / max(loss_before, 1e-30),
            "toward": float((made * wanted).sum() / wanted.pow(2).sum().clamp_min(1e-30)),
            "cosine": float((made * wanted).sum() / (made.norm() * wanted.norm()).clamp_min(1e-30)),
            "move_over_wanted": float(made.norm() / wanted.norm().clamp_min(1e-30)),
        }
    return result


# ---------------------------------------------------------------------------------------------------------
# The run


def probe_workload(name: str, args, bench_args, device: torch.device, deadline: float, save) -> dict:
    say(f"{name}: building the GRAM-1E situation")
    s = build_situation(name, args, bench_args, device)
    record: dict = {"info": s.info, "targets": target_moves(s), "variants": {}, "skipped": []}
    say(f"{name}: {s.info['rows']} rows of {s.info['touched']} touched after {s.info['cf_steps']} CF steps; "
        f"move/|CE| median {record['targets']['move_over_norm_median']:.2e}")
    restore(s)
    record["noise_floor"] = noise_floor(s, args.alt_micro)
    before = {"fp32": measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=False)}
    if device.type == "cuda":
        before["bf16"] = measure(s.encoder, s.tokens, s.items, s.micro_items, autocast=True)
    save(record)
    todo = variants(args.sgd_lr)
    for done, v in enumerate(todo):
        if time.perf_counter() > deadline:
            record["skipped"].append(v.name)
            continue
        record["variants"][v.name] = {"variant": asdict(v), **run_variant(s, v, args, device, before)}
        r = record["variants"][v.name]
        say(f"{name}: [{done + 1}/{len(todo)}] {v.name}: loss change fp32 {r['fp32']['change']:+.2e}"
            + (f", bf16 {r['bf16']['change']:+.2e}" if "bf16" in r else "") + f" ({r['seconds']:.1f} s)")
        save(record)
    restore(s)
    return record


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def table(results: dict) -> str:
    lines = []
    for name, rec in results["workloads"].items():
        if "targets" not in rec:
            lines += [f"### {name}: {rec.get('error', 'no result')}", ""]
            continue
        info, moves = rec["info"], rec["targets"]
        lines += [f"### {name}: {info['rows']} rows ({info['touched']} touched), {info['cf_steps']} CF steps, "
                  f"regress_lr {info['regress_lr']:g}, batch {info['regress_batch_size']}",
                  "", f"Targets' move ||row - CE|| / ||CE||: median {moves['move_over_norm_median']:.2e}, "
                  f"mean {moves['move_over_norm_mean']:.2e}, max {moves['move_over_norm_max']:.2e}", "",
                  "| measurement vs reference | encodings' difference / wanted move | pseudo-loss difference / loss |",
                  "|---|---|---|"]
        for other, row in rec.get("noise_floor", {}).get("against", {}).items():
            lines.append(f"| {other} | {row['encoding_diff_over_wanted']:.3g} | {row['loss_diff_over_loss']:+.3g} |")
        lines += ["", "| variant | steps | loss change (fp32) | loss change (bf16) | toward (fp32) | cosine (fp32) "
                  "| move / wanted (fp32) | one step: param change | one step: encoding move / wanted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v, r in rec["variants"].items():
            bf16 = f"{r['bf16']['change']:+.3g}" if "bf16" in r else "-"
            lines.append(f"| {v} | {r['steps']} | {r['fp32']['change']:+.3g} | {bf16} | {r['fp32']['toward']:+.3g} | "
                         f"{r['fp32']['cosine']:+.3g} | {r['fp32']['move_over_wanted']:.3g} | "
                         f"{r.get('step_param_change', 0):.2e} | {r.get('step_encoding_move_over_wanted', 0):.3g} |")
        if rec["skipped"]:
            lines.append(f"\nskipped for time: {', '.join(rec['skipped'])}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=train_bench.ALL_WORKLOADS, default=None,
                        help="default: mind-title (smoke: mind-title)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder-dir", default=None, help="local HF model dir (e.g. an fp16 MiniLM copy)")
    parser.add_argument("--max-rows", type=int, default=None, help="regress onto at most this many touched rows")
    parser.add_argument("--max-steps", type=int, default=None, help="CF steps before the regression (default: epoch)")
    parser.add_argument("--probe-rows", type=int, default=1024, help="rows whose encodings measure one step's size")
    parser.add_argument("--alt-micro", type=int, default=256, help="the noise floor's other encoder batch size")
    parser.add_argument("--sgd-lr", type=float, default=1e-3, help="the SGD variants' lowest learning rate (x10, x100)")
    parser.add_argument("--time-budget-s", type=float, default=120.0, help="variants past it are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "regression_probe"))
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder and data on CPU (tests)")
    args = parser.parse_args(argv)
    args.workloads = args.workloads or ["mind-title"]
    bench_argv = ["--data-root", args.data_root, "--seed", str(args.seed), "--cf-step", "eager",
                  *(["--encoder-dir", args.encoder_dir] if args.encoder_dir else []), *(["--smoke"] if args.smoke else [])]
    bench_args = train_bench.parse_args(bench_argv)
    if args.smoke:
        args.max_steps = args.max_steps or 3
        args.probe_rows = min(args.probe_rows, 16)
        bench_args.regress_batch_size = None  # the configured regression batch, as the trainer runs it
    return args, bench_args


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args, bench_args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": {"argv": list(sys.argv[1:] if argv is None else argv), "device": str(device),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                     "workloads": {}}

    def save(record: dict | None = None, name: str | None = None) -> None:
        if record is not None and name is not None:
            results["workloads"][name] = record
        (out / "regression_probe.json").write_text(json.dumps(results, indent=1))
        (out / "regression_probe.md").write_text(table(results))

    end = started + args.time_budget_s
    for left, name in zip(range(len(args.workloads), 0, -1), args.workloads):
        deadline = time.perf_counter() + (end - time.perf_counter()) / left  # an equal share of what is left
        if time.perf_counter() > end:
            say(f"{name}: skipped, no time left")
            continue
        try:
            record = probe_workload(name, args, bench_args, device, deadline, lambda r, n=name: save(r, n))
        except Exception as error:  # noqa: BLE001 - one workload's failure must not lose the others' numbers
            say(f"{name}: failed: {type(error).__name__}: {error}")
            results["workloads"].setdefault(name, {"info": {}, "variants": {}, "skipped": []})["error"] = repr(error)
            if args.smoke:
                raise
            continue
        save(record, name)
    results["meta"]["elapsed_s"] = time.perf_counter() - started
    save()
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
