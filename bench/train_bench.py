"""GPU training benchmark: how close each training strategy gets to the GPU's limit (issue "Training at the GPU's limit").

One command, sized for a 10-minute call on one H100 (every stage has a time cap; what was cut is printed):

    python bench/train_bench.py --data-root ../shared/data --encoder-dir DIR [--time-budget-s 530] [--out DIR]
    python bench/train_bench.py --smoke --device cpu           # tiny CPU run of every code path (tests)

On the device box (repo copied, data and fp16 MiniLM carried under .carry/, extra wheels in /tmp/site):

    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/train_bench.py --data-root .carry/data
        --encoder-dir .carry/minilm [--disable-cudnn-sdpa]          (one line)

Workloads (`--workloads`):
  real       kt-codeworkout, nr-mind: the real task classes on the shared data (KnowledgeTracingTask / NewsTask)
  synthetic  mind-title (NR), poj, toeic (KT): the GRAM paper's item counts, interaction counts and mean text
             lengths, Zipf item popularity (bench/workloads.py), `--scale` of the interactions kept

Per workload and strategy (E2E, GRAM 1S / 10S / 0.5E / 1E, GRAM-1E with the bottom --freeze-bottom-layers
layers frozen and cached (gram-1e-frozen), NoFinetune), all at the same CF batch:
  * epoch time: E2E and GRAM-1S from steady throughput (`--steady-steps` steps after `--warmup-steps`),
    the others from one whole epoch (initial table encoding and regressions included);
  * encoder items/s (forward and backward item passes from the encoder's counters / time), peak GPU memory;
  * the physical floor: this GPU's forward-only and forward+backward encoder rates at the workload's token
    lengths (ContentEncoder.encode, same bucketing), and the CF head alone (NoFinetune's steps without the
    table encoding): floor = N / fwd_rate + touched / fwdbwd_rate + CF time, against GRAM-1E's epoch;
  * real data only: `trainer.train.train` per strategy -> time to best validation metric, test metric, and a
    plot of validation metric against wall-clock time (time_to_best.png, needs matplotlib).

Targets are printed as PASS/FAIL rows. Everything goes to `--out` (default $OUT, else bench/results/train):
train_bench.json (every number, rewritten after every stage), train_bench.md (the tables), time_to_best.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bench.workloads import SPECS, build_synthetic
from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.trainer.memory_budget import MemoryBudgetError
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.static_batches import StaticBatch
from gramrec.trainer.strategies import GramMultiStep, make_strategy
from gramrec.trainer.train import Run, static_step_for, train_step

# label -> (TrainSettings.strategy, period); table order
STRATEGIES: dict[str, tuple[str, str]] = {
    "e2e": ("e2e", "1e"),
    "gram-1s": ("gram", "1s"),
    "gram-10s": ("gram", "10s"),
    "gram-0.5e": ("gram", "0.5e"),
    "gram-1e": ("gram", "1e"),
    "gram-1e-frozen": ("gram", "1e"),  # + the bottom --freeze-bottom-layers layers frozen and cached (IISAN-style)
    "nofinetune": ("nofinetune", "1e"),
}
FROZEN = "gram-1e-frozen"
STEADY = ("e2e", "gram-1s")  # timed from steady throughput; the rest run whole epochs
# Execution order: what a stage leaves unused rolls over to the later ones. Synthetic: the steady E2E / 1S
# first (the speedups need them); real data: the cheap whole epochs first, then E2E / 1S take what is left.
RUN_ORDER = {"synthetic": ["e2e", "gram-1s", "nofinetune", "gram-1e", FROZEN, "gram-0.5e", "gram-10s"],
             "real": ["nofinetune", "gram-1e", FROZEN, "gram-0.5e", "gram-10s", "e2e", "gram-1s"]}
TRAIN_ORDER = ["nofinetune", "gram-1e", FROZEN, "gram-0.5e", "gram-10s", "gram-1s", "e2e"]  # E2E last: gets the rollover
REAL = {"kt-codeworkout": ("kt", "codeworkout_s19"), "nr-mind": ("nr", "mind_small_subset")}
ALL_WORKLOADS = ["mind-title", "toeic", "kt-codeworkout", "nr-mind", "poj"]
# Shares of the time budget (what a part leaves unused rolls over to the parts after it), sized from an H100
# run of the library as it is (cuDNN attention planning every new batch shape, see --disable-cudnn-sdpa).
WORKLOAD_SHARES = {"mind-title": 0.21, "toeic": 0.27, "kt-codeworkout": 0.14, "nr-mind": 0.26, "poj": 0.12}
SYNTH_STAGE_SHARES = {"floor": 0.05, "graph_check": 0.04, "e2e": 0.30, "gram-1s": 0.20, "nofinetune": 0.06, "gram-1e": 0.15, FROZEN: 0.10,
                      "gram-0.5e": 0.12, "gram-10s": 0.12}
REAL_STAGE_SHARES = {"floor": 0.03, "graph_check": 0.03, "nofinetune": 0.02, "gram-1e": 0.03, FROZEN: 0.03, "gram-0.5e": 0.03, "gram-10s": 0.04,
                     "e2e": 0.12, "gram-1s": 0.08, "train": 0.65}
GRAPH_TOLERANCE = 1e-3  # float32, other summation orders (per-occurrence index_add_, capturable Adam), 60 steps
RESERVE_S = 10.0  # kept back from the budget for the JSON, the plot and the tables
GIB = 2**30

_T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_memory(device: torch.device) -> int | None:
    """GPU memory still allocated before a run starts (the peak includes it: a run's own share is the difference)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    """The caching allocator's peak reservation: what the process took from the GPU, CUDA graphs' private pools
    (whose blocks stay reserved between replays) included."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def is_oom(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or "out of memory" in str(error).lower()


def failure_text(error: BaseException) -> str | None:
    """What to record for a run that could not fit (out of memory, or a --encoder-memory-gib too small to hold the
    run's fixed part); None for any other error, which propagates."""
    if isinstance(error, MemoryBudgetError):
        return f"memory budget: {error}"
    if is_oom(error):
        return f"out of memory: {str(error).splitlines()[0][:160]}"
    return None


def memory_plan(strategy) -> dict:
    """The budget's caps and estimate (trainer/memory_budget.py), when --encoder-memory-gib is set."""
    plan = getattr(strategy, "memory_plan", None)
    if plan is None:
        return {}
    return {"memory_budget_bytes": plan.budget_bytes, "memory_plan": plan.as_dict()}


class Budget:
    """Splits the time left between named parts by share; what a part leaves unused rolls over to the rest."""

    def __init__(self, deadline: float, shares: dict[str, float], fixed: dict[str, float] | None = None):
        self.deadline = deadline
        self.pending = dict(shares)
        self.fixed = fixed or {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def take(self, name: str) -> float:
        """Seconds for `name` (removed from the pending parts)."""
        total = sum(self.pending.values()) or 1.0
        share = self.pending.pop(name, 0.0)
        cap = max(0.0, self.left()) * share / total
        if name in self.fixed:
            cap = min(self.fixed[name], max(0.0, self.left()))
        return cap


# ---------------------------------------------------------------------------------------------------------
# Encoders


class EncoderSource:
    """Builds fresh, identical content encoders for every strategy (same weights, same pooling init)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from transformers import BertConfig, BertModel

        self.device = device
        self.seed = args.seed
        if args.smoke:
            config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=512)
            self.description = "tiny random BertModel (hidden 32, 2 layers) [smoke]"
        elif args.random_encoder or not args.encoder_dir:
            config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, max_position_embeddings=512)
            self.description = "random BertModel of MiniLM-L6's shape (hidden 384, 6 layers, 12 heads)"
        else:
            config = None
        if config is not None:
            config._attn_implementation = "sdpa"
            torch.manual_seed(args.seed)
            self.backbone = BertModel(config, add_pooling_layer=False)
        else:
            self.backbone = ContentEncoder.from_pretrained(args.encoder_dir).backbone
            self.description = f"{args.encoder_dir} (float32 master weights)"
        self.backbone.eval()
        self.config = self.backbone.config
        self.params = sum(p.numel() for p in self.backbone.parameters())

    def make(self, pooling: str) -> ContentEncoder:
        torch.manual_seed(self.seed)
        encoder = ContentEncoder(copy.deepcopy(self.backbone), pooling=pooling)
        return encoder.train().to(self.device)


def smoke_encoder_dir(source: EncoderSource, tokenizer_dir: Path | None, root: Path) -> Path | None:
    """A local HF dir with the smoke encoder's weights and a real tokenizer, for the real-data train() runs."""
    from gramrec.models.content_encoder import default_encoder_dir, load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_dir or default_encoder_dir())
    except Exception as error:  # noqa: BLE001 - any failure means: no tokenizer available here
        say(f"no tokenizer for the smoke encoder ({type(error).__name__}: {error})")
        return None
    path = root / "smoke-encoder"
    source.backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Workloads as the benchmark sees them


@dataclass
class Workload:
    name: str
    kind: str  # "synthetic" or "real"
    task_name: str  # "kt" or "nr"
    task: object
    tokens: ItemTokens
    base: TrainSettings
    seed: int
    info: dict = field(default_factory=dict)
    synthetic: object = None  # bench.workloads.SyntheticWorkload
    frozen_layers: int = 3  # FROZEN's bottom layers
    epoch0: list | None = None

    def settings(self, label: str) -> TrainSettings:
        return self.base.model_copy(update=label_settings(label, self.frozen_layers))

    def epoch_batches(self, epoch: int) -> list:
        if epoch == 0 and self.epoch0 is not None:
            return self.epoch0
        return self.task.train_batches(np.random.default_rng([self.seed, epoch]))

    def batch_stream(self):
        epoch = 0
        while True:
            yield from self.epoch_batches(epoch)
            epoch += 1


def label_settings(label: str, frozen_layers: int) -> dict:
    """TrainSettings fields that make a table label's strategy."""
    strategy, period = STRATEGIES[label]
    return {"strategy": strategy, "period": period, "freeze_bottom_layers": frozen_layers if label == FROZEN else 0}


def _parse_per_workload(values: list[str] | None, cast) -> dict[str, object]:
    """['0.01'] -> {'*': 0.01}; ['toeic=0.02', 'poj=0.1'] -> per workload."""
    out: dict[str, object] = {}
    for value in values or []:
        for part in value.split(","):
            if not part:
                continue
            name, _, number = part.rpartition("=")
            out[name or "*"] = cast(number)
    return out


def base_settings(args, name: str, task: str, batch_size: int, device: torch.device, **extra) -> TrainSettings:
    budgets = _parse_per_workload(args.encoder_memory_gib, float)
    return TrainSettings(
        task=task, data=extra.pop("data", Path(".")), strategy="e2e", period="1e", batch_size=batch_size,
        encoder_memory_gib=budgets.get(name, budgets.get("*")),
        encoder_batch_size=args.encoder_batch_size,
        **({"regress_batch_size": args.regress_batch_size} if args.regress_batch_size else {}),
        **({"regress_max_passes": args.regress_max_passes} if args.regress_max_passes else {}),
        encoder_batch_tokens=args.encoder_batch_tokens, attention=args.attention, cf_step=args.cf_step,
        encoder_step=args.encoder_step,
        device=str(device), progress=False, seed=args.seed, **extra,
    )


def build_synthetic_workload(name: str, args, source: EncoderSource, device: torch.device) -> Workload:
    spec = SPECS[name]
    scales = _parse_per_workload(args.scale, float)
    batches = _parse_per_workload(args.batch_size, int)
    batch_size = int(batches.get(name, batches.get("*", 8 if args.smoke else spec.default_batch_size)))
    if args.smoke:  # about 3 steps per epoch, a few hundred short items
        per_step = batch_size * (75 if spec.task == "kt" else 1)
        scale = scales.get(name, scales.get("*", 3 * per_step / spec.interactions))
    else:
        scale = scales.get(name, scales.get("*", spec.default_scale))
    settings = base_settings(args, name, spec.task, batch_size, device)
    started = time.perf_counter()
    synth = build_synthetic(
        spec, settings, scale, vocab_size=source.config.vocab_size, seed=args.seed, exponent=args.zipf_exponent,
        max_items=300 if args.smoke else None, mean_tokens=min(spec.mean_tokens, 12) if args.smoke else None,
        max_tokens=source.config.max_position_embeddings,
    )
    workload = Workload(name, "synthetic", spec.task, synth.task, synth.tokens, settings, args.seed, synthetic=synth,
                        frozen_layers=min(args.freeze_bottom_layers, source.config.num_hidden_layers - 1))
    workload.info = {
        "paper": {"items": spec.num_items, "interactions": spec.interactions, "mean_tokens": spec.mean_tokens,
                  "R": spec.interactions / spec.num_items},
        "scale": scale, "zipf_exponent": args.zipf_exponent, "interactions": synth.interactions,
        "interaction_unit": "answer" if spec.task == "kt" else "click (history_len + 1 + negatives occurrences)",
        "build_s": time.perf_counter() - started,
    }
    return workload


def build_real_workload(name: str, args, source: EncoderSource, tokenizer_dir: Path | None,
                        device: torch.device) -> Workload:
    from gramrec.models.content_encoder import default_encoder_dir, load_tokenizer
    from gramrec.trainer.train import make_task

    task_name, folder = REAL[name]
    batches = _parse_per_workload(args.batch_size, int)
    batch_size = int(batches.get(name, batches.get("*", 8 if args.smoke else 32)))
    settings = base_settings(args, name, task_name, batch_size, device, data=Path(args.data_root) / folder)
    started = time.perf_counter()
    task = make_task(settings)
    tokenizer = load_tokenizer(tokenizer_dir or default_encoder_dir())
    tokens = ItemTokens.from_texts(tokenizer, task.items.texts, settings.max_tokens)
    workload = Workload(name, "real", task_name, task, tokens, settings, args.seed,
                        frozen_layers=min(args.freeze_bottom_layers, source.config.num_hidden_layers - 1))
    clicks = len(task.samples) if task_name == "nr" else task.interactions()
    workload.info = {"data": str(settings.data), "scale": 1.0, "interactions": clicks,
                     "interaction_unit": "answer" if task_name == "kt" else "click (training sample)",
                     "max_tokens": settings.max_tokens, "build_s": time.perf_counter() - started}
    return workload


def build_workload(name: str, args, source: EncoderSource, tokenizer_dir: Path | None,
                   device: torch.device) -> Workload:
    """The bench workload `name`: real data (tokenized with `tokenizer_dir`'s tokenizer) or synthetic."""
    if name in REAL:
        return build_real_workload(name, args, source, tokenizer_dir, device)
    return build_synthetic_workload(name, args, source, device)


def epoch_statistics(workload: Workload) -> dict:
    """Interactions, item occurrences and unique items of the epoch the whole-epoch strategies run."""
    started = time.perf_counter()
    batches = workload.epoch_batches(0)
    workload.epoch0 = batches
    occurrences = torch.cat([b.occurrences for b in batches]) if batches else torch.zeros(0, dtype=torch.long)
    unique = torch.unique(occurrences)
    lengths = workload.tokens.lengths.double()
    interactions = workload.info["interactions"]
    return {
        "items": len(workload.tokens),
        "mean_tokens": float(lengths.mean()),
        "mean_tokens_seen": float(lengths[occurrences].mean()) if len(occurrences) else None,
        "max_tokens": int(workload.tokens.lengths.max()),
        "batch_size": workload.base.batch_size,
        "steps_per_epoch": len(batches),
        "interactions": interactions,
        "occurrences": len(occurrences),
        "unique_items": len(unique),
        "R": interactions / max(1, len(unique)),
        "R_occurrences": len(occurrences) / max(1, len(unique)),
        "batch_build_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------
# Measurements


def build_run(workload: Workload, label: str, source: EncoderSource, device: torch.device) -> tuple[Run, float]:
    """A training run of one strategy on fresh, identical weights -> (run, seconds make_strategy took: the
    initial table encoding of multi-step GRAM and NoFinetune)."""
    settings = workload.settings(label)
    encoder = source.make(settings.pooling)
    torch.manual_seed(workload.seed)
    head = workload.task.build_head(encoder.dim).to(device)
    t0 = now(device)
    strategy = make_strategy(encoder, workload.tokens, head, settings, workload.task.steps_per_epoch())
    init_s = now(device) - t0
    parts = {"settings": settings, "device": device, "task": workload.task, "tokenizer": None, "encoder": encoder,
             "tokens": workload.tokens, "head": head, "strategy": strategy, "setup_s": init_s,
             "static_step": static_step_for(strategy, workload.task, settings, device)}
    names = {f.name for f in dataclasses.fields(Run)}
    return Run(**{k: v for k, v in parts.items() if k in names}), init_s


class Progress:
    """Prints a progress line every `every_s` seconds: steps, step rate, items/s and ETA."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self.last = time.perf_counter()

    def tick(self, done: int, items: int) -> None:
        t = time.perf_counter()
        if t - self.last < self.every_s:
            return
        self.last = t
        rate = done / (t - self.started)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        say(f"  {self.what}: {done}/{self.total} steps, {rate:.1f} steps/s, {items / (t - self.started):,.0f} "
            f"encoder items/s, ETA {eta:.0f}s")


def measure_steady(workload: Workload, label: str, source: EncoderSource, device: torch.device, args,
                   cap_s: float) -> dict:
    """Mean step time over `steady_steps` steps after warm-up; epoch time = step time x steps per epoch."""
    started = time.perf_counter()
    stream = workload.batch_stream()
    warm = [next(stream) for _ in range(args.warmup_steps)]
    timed = [next(stream) for _ in range(args.steady_steps)]
    occurrences = sum(len(b.occurrences) for b in timed)
    reset_memory(device)
    baseline = allocated_memory(device)
    run, _ = build_run(workload, label, source, device)
    if run.static_step is not None:  # padded and on the device before the loop, as train() does per epoch
        warm, timed = run.static_step.prepare(warm), run.static_step.prepare(timed)
    for batch in warm:
        train_step(run, batch)
    encoder = run.encoder
    f0, b0 = encoder.items_forward, encoder.items_backward
    progress = Progress(f"{workload.name} {label}", len(timed))
    deadline = started + cap_s
    t0 = now(device)
    done = 0
    for batch in timed:
        train_step(run, batch)
        done += 1
        progress.tick(done, encoder.items_forward - f0)
        if time.perf_counter() > deadline:
            break
    elapsed = now(device) - t0
    unique = sum(len(torch.unique(real_occurrences(b))) for b in timed[:done])
    occurrences = sum(len(real_occurrences(b)) for b in timed[:done])
    step_s = elapsed / max(done, 1)
    steps_per_epoch = workload.task.steps_per_epoch()
    result = {
        "method": "steady", "warmup_steps": len(warm), "steps_timed": done, "timed_s": elapsed,
        "step_s": step_s, "epoch_s": step_s * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "occurrences_per_step": occurrences / max(done, 1), "unique_per_step": unique / max(done, 1),
        "R_step": occurrences / max(unique, 1),
        "encoder_items_forward": encoder.items_forward - f0, "encoder_items_backward": encoder.items_backward - b0,
        "fwd_items_per_s": (encoder.items_forward - f0) / elapsed,
        "bwd_items_per_s": (encoder.items_backward - b0) / elapsed,
        "peak_memory_bytes": peak_memory(device), "peak_reserved_bytes": peak_reserved(device),
        "encoder_graphs": encoder_graph_stats(run.strategy),
        "memory_baseline_bytes": baseline, **graph_stats(run), **memory_plan(run.strategy),
    }
    if done < args.steady_steps:
        result["short"] = f"time cap {cap_s:.0f}s hit after {done}/{args.steady_steps} steps"
    return result


def measure_epoch(workload: Workload, label: str, source: EncoderSource, device: torch.device, args,
                  cap_s: float) -> dict:
    """One whole epoch: strategy construction (initial table encoding) + every step + its regressions.

    If the cap (or --max-epoch-steps) stops it early, the epoch is extrapolated from the steps done
    (marked partial); a GRAM-1E cut short runs its regression on the rows touched so far and scales it.
    """
    batches = workload.epoch_batches(0)
    steps = len(batches)
    limit = min(steps, args.max_epoch_steps or steps)
    reset_memory(device)
    baseline = allocated_memory(device)
    run, init_s = build_run(workload, label, source, device)
    t_start = time.perf_counter() - init_s
    strategy, encoder = run.strategy, run.encoder
    regress_log: list[tuple[float, int]] = []
    if isinstance(strategy, GramMultiStep):
        original = strategy.regress

        def timed_regress() -> None:
            # Rows regressed onto (the touched rows), not backward item passes: a regression of several passes
            # costs several per row, and the floor and projections count one fwd+bwd per touched row.
            rows = int(strategy.touched.sum())
            t = now(device)
            original()
            regress_log.append((now(device) - t, rows))

        strategy.regress = timed_regress
    f0 = encoder.items_forward
    progress = Progress(f"{workload.name} {label}", limit)
    deadline = t_start + cap_s
    t0 = time.perf_counter()
    done = 0
    epoch = run.static_step.stream(batches[:limit]) if run.static_step is not None else batches[:limit]  # as train()
    for batch in epoch:
        train_step(run, batch)
        done += 1
        progress.tick(done, encoder.items_forward - f0)
        if time.perf_counter() > deadline:
            break
    loop_s = now(device) - t0
    regress_s = sum(t for t, _ in regress_log)
    regress_items = sum(n for _, n in regress_log)
    steps_s = loop_s - regress_s  # CF steps, lazy re-encodings, table updates
    result = {
        "method": "whole epoch", "steps_run": done, "steps_per_epoch": steps, "init_s": init_s,
        "steps_s": steps_s, "regress_s": regress_s, "regressions": len(regress_log),
        "regress_items": regress_items, "partial": done < steps,
    }
    if done < steps:
        factor = steps / max(done, 1)
        regress_est = 0.0
        if isinstance(strategy, GramMultiStep):
            # Regression cost per item, observed or from a regression forced on the rows touched so far,
            # times the items the whole epoch's regressions cover (unique items of each period's steps).
            if not regress_log and bool(strategy.touched.any()):
                # Time a regression on (at most `forced_items` of) the rows touched so far.
                rows = strategy.touched.nonzero().squeeze(1)
                strategy.touched.zero_()
                strategy.touched[rows[: args.forced_regress_items]] = True
                strategy.regress()
                result["regress_forced"] = {"s": regress_log[-1][0], "items": regress_log[-1][1]}
            per_item = sum(t for t, _ in regress_log) / max(1, sum(n for _, n in regress_log))
            period = strategy.period_steps
            epoch_items = sum(len(torch.unique(torch.cat([b.occurrences for b in batches[k * period : (k + 1) * period]])))
                              for k in range(steps // period))
            regress_est = per_item * epoch_items
            result["regress_items_epoch_est"] = epoch_items
        epoch_s = init_s + steps_s * factor + regress_est
        result["regress_s_est"] = regress_est
        result["partial_reason"] = ("--max-epoch-steps" if done == limit and limit < steps
                                    else f"time cap {cap_s:.0f}s")
    else:
        epoch_s = init_s + loop_s
    elapsed = init_s + loop_s
    result.update({
        "epoch_s": epoch_s, "measured_s": elapsed,
        "encoder_items_forward": encoder.items_forward, "encoder_items_backward": encoder.items_backward,
        "fwd_items_per_s": encoder.items_forward / elapsed, "bwd_items_per_s": encoder.items_backward / elapsed,
        "cf_step_s": steps_s / max(done, 1), "peak_memory_bytes": peak_memory(device),
        "peak_reserved_bytes": peak_reserved(device),
        "encoder_graphs": encoder_graph_stats(strategy),
        "memory_baseline_bytes": baseline, **graph_stats(run), **memory_plan(strategy),
        "regression_reports": [r.as_dict() for r in getattr(strategy, "reports", [])],
    })
    strategy.__dict__.pop("regress", None)  # break the strategy <-> wrapper cycle
    return result


def real_occurrences(batch) -> torch.Tensor:
    """A batch's item occurrences without the static step's padding."""
    return batch.batch.occurrences[: batch.real] if isinstance(batch, StaticBatch) else batch.occurrences


def graph_stats(run: Run) -> dict:
    """How the CF step ran: eager, or static shapes with this many CUDA graph captures (their time is inside the
    timed loop, so in the epoch and step times)."""
    step = run.static_step
    if step is None:
        return {"cf_step": "eager"}
    return {"cf_step": "graphed" if step.capture else "static (no capture)", "graph_captures": step.captures,
            "graph_capture_s": step.capture_s, "graph_replays": step.replays, "graph_shapes": len(step.shapes),
            "prepare_s": step.prepare_s, "pad_s": step.pad_s}


def encoder_graph_stats(strategy) -> dict | None:
    """How the encoder's training calls ran (trainer/encoder_graphs.py; None: eagerly)."""
    graphs = getattr(strategy, "regress_graphs", None) or getattr(strategy, "train_graphs", None)
    if graphs is None:
        return None
    return {"shapes": len(graphs.shapes), "captures": graphs.captures, "capture_s": round(graphs.capture_s, 3),
            "replays": graphs.replays, "capture_error": graphs.capture_error}


def no_dropout(module: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere (nn.Dropout, nn.LSTM's and NRMS attention's float `dropout`)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


def differences(run: dict, reference: dict) -> dict[str, float]:
    """Largest relative differences of two check runs: per-step losses, head weights (over the largest weight)
    and item table (over its largest entry; 0 without a table)."""
    scale = max(float(v.abs().max()) for v in reference["head"].values())
    head = max(float((run["head"][k] - v).abs().max()) for k, v in reference["head"].items()) / scale
    loss = float(((run["losses"] - reference["losses"]).abs() / reference["losses"].abs()).max())
    table = 0.0
    if reference["table"] is not None:
        table = float((run["table"] - reference["table"]).abs().max() / reference["table"].abs().max())
    return {"loss": loss, "head": head, "table": table}


@contextlib.contextmanager
def exact_float32(on: bool):
    """TF32 off for cuDNN (the LSTM) and cuBLAS while `on`: cuDNN's default TF32 rounds each matmul to 10 mantissa
    bits with an algorithm chosen per shape, so an eager step and a graphed one (padded to a bucket) differ by that
    rounding, not by what they compute (measured: BENCHMARKS.md §3, sixth session)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if on:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_graphed(workload: Workload, source: EncoderSource, device: torch.device, args, cap_s: float) -> dict:
    """The graphed CF step against the eager reference, dropout off, in exact float32 (TF32 off unless
    --graph-check-tf32): the same batches from the same weights must give the same losses, head weights and item
    table to float tolerance. Also times both steps (after warm-up and capture) on the same batches: the per-step
    overhead the graphs remove."""
    with exact_float32(not args.graph_check_tf32):
        out = _check_graphed(workload, source, device, args, cap_s)
    return out | {"tf32": bool(args.graph_check_tf32)}


def _check_graphed(workload: Workload, source: EncoderSource, device: torch.device, args, cap_s: float) -> dict:
    deadline = time.perf_counter() + cap_s
    batches = workload.epoch_batches(0)[: (6 if args.smoke else 60)]
    out: dict = {"steps": len(batches)}
    for label in ("nofinetune", "gram-1e"):
        if time.perf_counter() > deadline or label not in args.strategies:
            continue
        runs = {}
        # Multi-step GRAM's index_add_ sums repeated items' gradients with atomics, in no fixed order: a second
        # graphed run measures that run-to-run noise, the float tolerance the comparison with eager is held to.
        for mode in ("eager", "graphed", "graphed-repeat") if label == "gram-1e" else ("eager", "graphed"):
            reset_memory(device)
            # Multi-step GRAM with no regression inside the check: it compares CF steps (gather, head, index_add_).
            update = {"cf_step": mode.split("-")[0]} | ({"period": f"{len(batches) + 1}s"} if label == "gram-1e" else {})
            settings = workload.settings(label).model_copy(update=update)
            encoder = source.make(settings.pooling)
            torch.manual_seed(workload.seed)
            head = workload.task.build_head(encoder.dim).to(device)
            strategy = make_strategy(encoder, workload.tokens, head, settings, workload.task.steps_per_epoch())
            run = Run(settings, device, workload.task, None, encoder, workload.tokens, head, strategy, 0.0,
                      static_step=static_step_for(strategy, workload.task, settings, device))
            no_dropout(head)  # eager and graphed then compute the same function (train mode: cuDNN's LSTM backward)
            steps = run.static_step.prepare(batches) if run.static_step is not None else batches
            losses, half = [], len(steps) // 2
            t0 = now(device)
            for i, batch in enumerate(steps):
                if i == half:
                    t0 = now(device)
                losses.append(train_step(run, batch))
            step_s = (now(device) - t0) / max(1, len(steps) - half)
            table = getattr(strategy, "table", None)
            runs[mode] = {"losses": torch.stack(losses).double().cpu(), "step_s": step_s,
                          "head": {k: v.detach().double().cpu() for k, v in head.state_dict().items()},
                          "table": table.detach().double().cpu() if table is not None else None, **graph_stats(run)}
        eager, graphed = runs["eager"], runs["graphed"]
        diff = differences(graphed, eager)
        noise = differences(runs["graphed-repeat"], graphed) if "graphed-repeat" in runs else None
        tolerance = max(GRAPH_TOLERANCE, 10 * max(noise.values(), default=0.0)) if noise else GRAPH_TOLERANCE
        worst = max(diff.values())
        out[label] = {"eager_step_ms": eager["step_s"] * 1e3, "graphed_step_ms": graphed["step_s"] * 1e3,
                      **{f"max_rel_{k}_diff": v for k, v in diff.items()},
                      "graphed_repeat": noise, "tolerance": tolerance, "agree": worst <= tolerance,
                      "graphed": {k: v for k, v in graphed.items() if k.startswith(("cf_step", "graph_"))}}
        say(f"{workload.name} graph check {label}: eager {eager['step_s'] * 1e3:.2f} ms/step, graphed "
            f"{graphed['step_s'] * 1e3:.2f} ms/step; max relative difference loss {diff['loss']:.1e}, head "
            f"{diff['head']:.1e}, table {diff['table']:.1e}"
            + (f" (graphed vs graphed: loss {noise['loss']:.1e}, head {noise['head']:.1e}, table {noise['table']:.1e})"
               if noise else "") + f" -> {'AGREE' if worst <= tolerance else 'DIFFER'}")
    reset_memory(device)
    return out


def measure_floor(workload: Workload, source: EncoderSource, device: torch.device, args, cap_s: float) -> dict:
    """This GPU's encoder ceiling at the workload's token lengths: forward-only (eval, no_grad) and
    forward+backward (train mode) items/s through ContentEncoder.encode, best over a few batch sizes.

    A uniform sample of the catalog is sorted by length once, so every batch pads only to its own longest
    item (the bucketing one encode() call does); forward+backward back-propagates each batch before the
    next, as the GRAM regression does. The first pass over the sample runs every batch shape once and is
    reported separately (`cold_*`): kernels that plan per shape (cuDNN attention) pay there, the ceiling is
    the warm passes after it.
    """
    tokens = workload.tokens
    rng = np.random.default_rng(args.seed)
    mean_len = float(tokens.lengths.double().mean())
    n = len(tokens)
    bs = args.encoder_batch_size
    token_budget = 4_000 if args.smoke else 400_000
    sample = min(n, 16 * bs, max(2 * bs, int(token_budget / mean_len)))
    idx = torch.from_numpy(rng.choice(n, size=sample, replace=False)) if sample < n else torch.arange(n)
    idx = idx[torch.argsort(tokens.lengths[idx], stable=True)]
    reset_memory(device)
    encoder = source.make("attention" if workload.task_name == "nr" else "mean")
    encoder.attention, encoder.batch_tokens = args.attention, args.encoder_batch_tokens
    deadline = time.perf_counter() + cap_s
    max_len = int(tokens.lengths[idx].max())
    fwd_sizes = [b for b in (bs, 4 * bs) if b == bs or (b * max_len <= 400_000 and not args.smoke and b < 2 * len(idx))]
    fwdbwd_sizes = [b for b in (bs, 4 * bs) if b == bs or (b * max_len <= 131_072 and not args.smoke and b < 2 * len(idx))]
    result = {"sample_items": len(idx), "mean_tokens_sample": float(tokens.lengths[idx].double().mean()),
              "fwd": {}, "fwdbwd": {}, "cold_fwd": {}, "cold_fwdbwd": {}}

    def forward(b: int) -> None:
        with torch.no_grad():
            encoder.encode(tokens, idx, b)

    def forward_backward(b: int) -> None:
        for start in range(0, len(idx), b):
            encoder.encode(tokens, idx[start : start + b], b).sum().backward()
        encoder.zero_grad(set_to_none=True)

    def rates(step, b: int) -> tuple[float, float]:
        t0 = now(device)
        step(b)  # every batch shape once: allocator growth, per-shape kernel planning
        cold = len(idx) / (now(device) - t0)
        items, t0 = 0, now(device)
        while True:
            step(b)
            items += len(idx)
            t = now(device) - t0
            if t >= args.floor_min_time or time.perf_counter() > deadline:
                return items / t, cold

    for mode, sizes, step, training in (("fwd", fwd_sizes, forward, False),
                                        ("fwdbwd", fwdbwd_sizes, forward_backward, True)):
        encoder.train(training)
        for b in sizes:
            if b != bs and time.perf_counter() > deadline:
                result.setdefault("not_measured", []).append(f"{mode} batch {b}: time cap")
                continue
            try:
                result[mode][str(b)], result[f"cold_{mode}"][str(b)] = rates(step, b)
            except Exception as error:
                if not is_oom(error):
                    raise
                result[mode][str(b)] = None
            encoder.zero_grad(set_to_none=True)
            gc.collect()
    for mode in ("fwd", "fwdbwd", "cold_fwd", "cold_fwdbwd"):
        values = [r for r in result[mode].values() if r]
        result[f"{mode}_items_per_s"] = max(values) if values else None
    result["peak_memory_bytes"] = peak_memory(device)
    return result


def run_strategy(workload: Workload, label: str, source, device, args, cap_s: float, record: dict) -> None:
    measure = measure_steady if label in STEADY else measure_epoch
    say(f"{workload.name} {label}: start (cap {cap_s:.0f}s)")
    error_text = None
    try:
        result = measure(workload, label, source, device, args, cap_s)
    except Exception as error:
        error_text = failure_text(error)
        if error_text is None:
            raise
        result = {"error": error_text, "peak_memory_bytes": peak_memory(device)}
    reset_memory(device)
    record[label] = result
    if error_text:
        say(f"{workload.name} {label}: FAILED {error_text}")
        return
    mem, budget = result["peak_memory_bytes"], result.get("memory_budget_bytes")
    say(f"{workload.name} {label}: epoch {result['epoch_s']:.2f}s ({result['method']}), encoder fwd "
        f"{result['fwd_items_per_s']:,.0f}/s bwd {result['bwd_items_per_s']:,.0f}/s"
        + (f", peak {mem / GIB:.2f} GiB (reserved {result['peak_reserved_bytes'] / GIB:.2f})"
           if mem is not None and result.get("peak_reserved_bytes") else f", peak {mem / GIB:.2f} GiB" if mem else "")
        + (f", encoder graphs {result['encoder_graphs']}" if result.get("encoder_graphs") else "")
        + (f" (budget {budget / GIB:.2f} GiB, caps {result['memory_plan']['forward_tokens']:,} / "
           f"{result['memory_plan']['backward_tokens'] or '-'} tokens)" if budget else "")
        + (f" [{result.get('short') or result.get('partial_reason')}]" if result.get("short") or result.get("partial") else ""))


# ---------------------------------------------------------------------------------------------------------
# Real data: time to best validation metric through the real training loop


def train_runs(workload: Workload, args, encoder_dir: Path, device: torch.device, cap_s: float,
               tmp: Path, skipped: list) -> dict:
    from gramrec.trainer.train import train

    budget = Budget(time.perf_counter() + cap_s, {label: 1.0 for label in TRAIN_ORDER if label in args.strategies})
    runs = {}
    for label in TRAIN_ORDER:
        if label not in args.strategies:
            continue
        cap = budget.take(label)
        if cap < (1 if args.smoke else 5):
            skipped.append(f"{workload.name} train {label}: no time left ({cap:.1f}s)")
            say(f"{workload.name} train {label}: SKIPPED (only {cap:.1f}s left)")
            continue
        out = tmp / f"{workload.name}-{label}"
        settings = workload.base.model_copy(update=label_settings(label, workload.frozen_layers) | {
            "epochs": args.real_epochs, "patience": args.patience,
            "out": out, "encoder_dir": encoder_dir, "time_budget_s": max(1.0, 0.8 * cap),
            "max_steps_per_epoch": args.max_epoch_steps,
        })
        say(f"{workload.name} train {label}: start ({args.real_epochs} epochs max, training budget "
            f"{settings.time_budget_s:.0f}s)")
        started = time.perf_counter()
        error_text = None
        try:
            with reuse_task(workload):
                report = train(settings)
        except Exception as error:
            error_text = failure_text(error)
            if error_text is None:
                raise
        shutil.rmtree(out, ignore_errors=True)
        reset_memory(device)
        if error_text:
            runs[label] = {"error": error_text}
            skipped.append(f"{workload.name} train {label}: {error_text}")
            say(f"{workload.name} train {label}: FAILED {error_text}")
            continue
        metric = workload.task.primary_metric
        keep = ("metrics", "best_val", "best_epoch", "epochs_run", "steps", "wall_time_s", "time_to_best_s",
                "checkpoint_io_s", "encoder_items_forward", "encoder_items_backward", "interactions_per_epoch",
                "peak_memory_bytes", "history")
        runs[label] = {k: report[k] for k in keep} | {"primary_metric": metric,
                                                       "call_s": time.perf_counter() - started}
        say(f"{workload.name} train {label}: best val {metric} {report['best_val']:.4f} at "
            f"{report['time_to_best_s'] or float('nan'):.1f}s, test {metric} {report['metrics'][metric]:.4f}, "
            f"{report['epochs_run']} epochs, wall {report['wall_time_s']:.1f}s (+{report['checkpoint_io_s']:.1f}s IO)")
    return runs


@contextlib.contextmanager
def reuse_task(workload: Workload):
    """train() builds its task from the settings; hand it the task already loaded for this workload instead
    (the same data and data settings), so six runs don't parse the dataset six times. Bench-only shortcut:
    the library has no hook to pass a task to train()."""
    import gramrec.trainer.train as train_module

    original = train_module.make_task
    base = workload.base
    same = ("task", "data", "batch_size", "max_seq_len", "history_len", "negatives", "cold_item_frac", "seed",
            "use_abstract")

    def make_task(settings: TrainSettings):
        if all(getattr(settings, k) == getattr(base, k) for k in same):
            return workload.task
        return original(settings)

    train_module.make_task = make_task
    try:
        yield
    finally:
        train_module.make_task = original


def plot_time_to_best(results: dict, path: Path) -> str | None:
    panels = [(name, w["train"]) for name, w in results["workloads"].items() if w.get("train")]
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("plot skipped: matplotlib is not installed (pip install gramrec[bench])")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, runs) in zip(axes[0], panels, strict=True):
        times = []
        for label in STRATEGIES:
            run = runs.get(label)
            if not run or not run.get("history"):
                continue
            metric = run["primary_metric"]
            xs = [h["elapsed_s"] for h in run["history"]]
            ys = [h["val"][metric] for h in run["history"]]
            times += xs
            line, = ax.plot(xs, ys, marker="o", label=label)
            best = int(np.argmax(ys))
            ax.plot([xs[best]], [ys[best]], marker="*", markersize=14, color=line.get_color())
        if times and max(times) / max(min(times), 1e-6) > 30:
            ax.set_xscale("log")
        ax.set_title(f"{name}: validation {metric.upper()} vs wall-clock")
        ax.set_xlabel("training wall-clock (s, checkpoint IO excluded)")
        ax.set_ylabel(f"val {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Derived numbers, targets and tables


def derive(workload: Workload, record: dict) -> None:
    """Speedups vs E2E, the floor comparison and (synthetic) the projection to the paper's full scale."""
    strategies = record["strategies"]
    e2e = strategies.get("e2e", {})
    for result in strategies.values():
        if "epoch_s" in result and "epoch_s" in e2e:
            result["speedup_vs_e2e"] = e2e["epoch_s"] / result["epoch_s"]
    g1s, nof, g1e = strategies.get("gram-1s", {}), strategies.get("nofinetune", {}), strategies.get("gram-1e", {})
    if "step_s" in g1s and "step_s" in e2e:
        g1s["step_speedup_vs_e2e"] = e2e["step_s"] / g1s["step_s"]
    floor = record.get("floor") or {}
    if "cf_step_s" in nof:
        floor["cf_head_epoch_s"] = nof["cf_step_s"] * nof["steps_per_epoch"]
        if "step_s" in e2e:
            record["encoder_share_of_e2e_step"] = 1 - nof["cf_step_s"] / e2e["step_s"]
    if floor.get("fwd_items_per_s") and floor.get("fwdbwd_items_per_s") and "cf_head_epoch_s" in floor:
        items = record["epoch"]["items"]
        touched = record["epoch"]["unique_items"]
        if g1e.get("regress_items") and not g1e.get("partial"):
            touched = g1e["regress_items"]
        floor["touched_items"] = touched
        floor["floor_s"] = items / floor["fwd_items_per_s"] + touched / floor["fwdbwd_items_per_s"] + floor["cf_head_epoch_s"]
        floor["floor_all_items_s"] = items * (1 / floor["fwd_items_per_s"] + 1 / floor["fwdbwd_items_per_s"]) + floor["cf_head_epoch_s"]
        if "epoch_s" in g1e:
            floor["gram_1e_over_floor"] = g1e["epoch_s"] / floor["floor_s"]
    synth = workload.synthetic
    if synth is not None and "epoch_s" in e2e and "epoch_s" in g1e and record["epoch"]["interactions"]:
        factor = synth.full_scale_factor()
        unique_full = synth.expected_unique_items(synth.spec.interactions)
        unique_run = (g1e.get("regress_items_epoch_est") if g1e.get("partial") else g1e.get("regress_items")) \
            or record["epoch"]["unique_items"]
        regress_s = g1e["regress_s_est"] if g1e.get("partial") else g1e["regress_s"]
        g1e_full = g1e["init_s"] + g1e["steps_s"] * g1e["steps_per_epoch"] / max(g1e["steps_run"], 1) * factor \
            + regress_s * unique_full / max(unique_run, 1)
        e2e_full = e2e["epoch_s"] * factor
        record["full_scale_projection"] = {
            "interactions": synth.spec.interactions, "factor": factor,
            "expected_unique_items": unique_full, "R": synth.spec.interactions / unique_full,
            "e2e_epoch_s": e2e_full, "gram_1e_epoch_s": g1e_full, "gram_1e_speedup": e2e_full / g1e_full,
            "method": "E2E: steady step time x full steps; GRAM-1E: measured table encoding + CF steps x full/run "
                      "interactions + regression x expected unique items at full scale / items regressed",
        }


def targets(results: dict) -> list[dict]:
    rows = []

    def add(name, workload, measured, threshold, ok, detail=""):
        rows.append({"target": name, "workload": workload, "measured": measured, "threshold": threshold,
                     "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    for name, rec in results["workloads"].items():
        s = rec.get("strategies", {})
        e2e, g1s, g1e = s.get("e2e", {}), s.get("gram-1s", {}), s.get("gram-1e", {})
        if "step_speedup_vs_e2e" in g1s:
            share = rec.get("encoder_share_of_e2e_step")
            dominated = share is not None and share >= 0.9  # issue #11: E2E step at least 90% encoder
            need = 0.9 * g1s["R_step"]
            add("GRAM-1S step speedup >= 0.9 x R_step (encoder-dominated)", name,
                f"{g1s['step_speedup_vs_e2e']:.2f}x", f"{need:.2f}x (R_step {g1s['R_step']:.2f})",
                g1s["step_speedup_vs_e2e"] >= need if dominated else None,
                f"encoder share of the E2E step {share:.0%}" if share is not None else "encoder share unknown")
        as_run, projected = {"mind-title": (8, 50), "toeic": (40, 146)}.get(name, (None, None))
        if as_run and "speedup_vs_e2e" in g1e:
            scale = rec["epoch"]
            add(f"GRAM-1E epoch >= {as_run}x faster than E2E (as run)", name, f"{g1e['speedup_vs_e2e']:.1f}x",
                f"{as_run}x", g1e["speedup_vs_e2e"] >= as_run,
                f"scale {rec['info']['scale']:g}, R {scale['R']:.1f}, R_occ {scale['R_occurrences']:.1f}")
            proj = rec.get("full_scale_projection")
            if proj:
                add(f"GRAM-1E epoch >= {projected}x faster than E2E (projected to full scale)", name,
                    f"{proj['gram_1e_speedup']:.1f}x", f"{projected}x", proj["gram_1e_speedup"] >= projected,
                    f"R {proj['R']:.1f}; projection, not a measurement")
        nof = s.get("nofinetune", {})
        if "cf_step_s" in nof:
            limit_ms = 0.6 if rec["task"] == "nr" else 1.5
            step_ms = nof["cf_step_s"] * 1e3
            captures = nof.get("graph_capture_s", 0.0)
            without = (nof["steps_s"] - captures) / max(nof["steps_run"], 1) * 1e3
            prepare = nof.get("prepare_s", 0.0) / max(nof["steps_run"], 1) * 1e3
            add(f"CF step <= {limit_ms} ms in the real loop (NoFinetune's steps, captures included)", name,
                f"{step_ms:.2f} ms", f"{limit_ms} ms", step_ms <= limit_ms,
                f"{nof.get('cf_step')}; {without:.2f} ms without the {captures:.2f}s of "
                f"{nof.get('graph_captures', 0)} captures over {nof['steps_run']} steps, of which {prepare:.3f} ms "
                "padding the batches and queueing their copies")
        check = rec.get("graph_check") or {}
        for label in ("nofinetune", "gram-1e"):
            c = check.get(label)
            if c:
                noise = c.get("graphed_repeat")
                add(f"graphed CF step equals eager ({label}, dropout off)", name,
                    f"loss {c['max_rel_loss_diff']:.1e}, head {c['max_rel_head_diff']:.1e}, table "
                    f"{c['max_rel_table_diff']:.1e}", f"<= {c['tolerance']:.1e} relative"
                    + (f" (10x graphed vs graphed: head {noise['head']:.1e}, table {noise['table']:.1e})" if noise else ""),
                    c["agree"],
                    f"{check['steps']} steps; eager {c['eager_step_ms']:.2f} ms/step, graphed "
                    f"{c['graphed_step_ms']:.2f} ms/step ({c['graphed'].get('cf_step')})")
        if e2e.get("peak_memory_bytes") and g1e.get("peak_memory_bytes"):
            ratio = g1e["peak_memory_bytes"] / e2e["peak_memory_bytes"]
            add("GRAM-1E peak memory <= 25% of E2E", name, f"{ratio:.1%}", "25%", ratio <= 0.25,
                f"{g1e['peak_memory_bytes'] / GIB:.2f} vs {e2e['peak_memory_bytes'] / GIB:.2f} GiB")
        for label, r in s.items():
            if r.get("memory_budget_bytes") and r.get("peak_memory_bytes"):
                bounded = r["memory_plan"]["backward_tokens"] is not None or label == "nofinetune"
                # The run's own peak: what this process held before the run (earlier workloads' leftovers, the
                # floor's) is not the run's, and a training process starts without it.
                own = r["peak_memory_bytes"] - (r.get("memory_baseline_bytes") or 0)
                add(f"peak memory within --encoder-memory-gib ({label})", name,
                    f"{own / GIB:.2f} GiB (process {r['peak_memory_bytes'] / GIB:.2f})",
                    f"{r['memory_budget_bytes'] / GIB:.2f} GiB",
                    own <= r["memory_budget_bytes"] if bounded else None,
                    f"estimate: fixed {r['memory_plan']['fixed_bytes'] / GIB:.2f} GiB + {r['memory_plan']['forward_bytes_per_token']:,} B "
                    f"(forward) / {r['memory_plan']['backward_bytes_per_token']:,} B (backward) per token; allocated "
                    f"before the run {fmt(r.get('memory_baseline_bytes') and r['memory_baseline_bytes'] / GIB)} GiB"
                    + ("" if bounded else "; the training step's graph is not bounded by the caps"))
        floor = rec.get("floor") or {}
        if "gram_1e_over_floor" in floor:
            add("GRAM-1E epoch within 1.5x of the floor", name, f"{floor['gram_1e_over_floor']:.2f}x", "1.5x",
                floor["gram_1e_over_floor"] <= 1.5,
                f"{g1e['epoch_s']:.2f}s vs floor {floor['floor_s']:.2f}s" + (" (1E partial)" if g1e.get("partial") else ""))
        frozen = s.get(FROZEN, {})
        if "epoch_s" in frozen and "epoch_s" in g1e:
            add(f"{FROZEN}: epoch time and peak memory vs GRAM-1E (information)", name,
                f"{g1e['epoch_s'] / frozen['epoch_s']:.2f}x faster", "-", None,
                f"{frozen['epoch_s']:.2f}s vs {g1e['epoch_s']:.2f}s (cache build in init {frozen['init_s']:.2f}s); "
                f"peak {fmt(frozen.get('peak_memory_bytes') and frozen['peak_memory_bytes'] / GIB)} vs "
                f"{fmt(g1e.get('peak_memory_bytes') and g1e['peak_memory_bytes'] / GIB)} GiB")
        runs = rec.get("train") or {}
        if "metrics" in runs.get(FROZEN, {}) and "metrics" in runs.get("gram-1e", {}):
            metric = runs["gram-1e"]["primary_metric"]
            a, b = runs["gram-1e"]["metrics"][metric], runs[FROZEN]["metrics"][metric]
            if a is not None and b is not None:
                add(f"{FROZEN}: test {metric} vs GRAM-1E (information)", name, f"{(b - a) * 100:+.2f} pt", "-", None,
                    f"{b:.4f} vs {a:.4f}; time to best {fmt(runs[FROZEN]['time_to_best_s'], '.1f')}s vs "
                    f"{fmt(runs['gram-1e']['time_to_best_s'], '.1f')}s")
        if "metrics" in runs.get("e2e", {}) and "metrics" in runs.get("gram-1e", {}):
            metric = runs["e2e"]["primary_metric"]
            a, b = runs["e2e"]["metrics"][metric], runs["gram-1e"]["metrics"][metric]
            if a is not None and b is not None:
                diff = (b - a) * 100
                add(f"GRAM-1E test {metric} within 0.5 points of E2E", name, f"{diff:+.2f} pt", ">= -0.50 pt",
                    diff >= -0.5, f"GRAM-1E {b:.4f} vs E2E {a:.4f}")
    return rows


def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def budget_cell(result: dict) -> str:
    """'1.52: 1.31, 60,000 / 9,000' (budget: the plan's estimate of its largest call, its token caps) or '-'."""
    plan = result.get("memory_plan")
    if not plan:
        return "-"
    backward = plan["backward_tokens"]
    largest = plan["fixed_bytes"] + max(plan["forward_tokens"] * plan["forward_bytes_per_token"],
                                        (backward or 0) * plan["backward_bytes_per_token"])
    return (f"{plan['budget_bytes'] / GIB:.2f}: {largest / GIB:.2f}, {plan['forward_tokens']:,} / "
            f"{'-' if backward is None else f'{backward:,}'}")


def tables(results: dict) -> str:
    lines = [f"## Training benchmark — {results['meta']['device_name']}, encoder: {results['meta']['encoder']}", ""]
    lines += [("| workload | task | items | scale | interactions | R | occurrences | R_occ | unique items | mean tokens "
              "| batch | steps/epoch | fwd floor items/s (1st pass) | fwd+bwd floor items/s (1st pass) | CF head epoch (s) "
               "| floor (s) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["workloads"].items():
        e, fl = rec.get("epoch"), rec.get("floor") or {}
        if not e:
            continue
        lines.append(f"| {name} | {rec['task']} | {e['items']:,} | {rec['info']['scale']:g} | {e['interactions']:,} | "
                     f"{e['R']:.1f} | {e['occurrences']:,} | {e['R_occurrences']:.1f} | {e['unique_items']:,} | "
                     f"{e['mean_tokens']:.1f} | {e['batch_size']} | {e['steps_per_epoch']:,} | "
                     f"{fmt(fl.get('fwd_items_per_s'), ',.0f')} ({fmt(fl.get('cold_fwd_items_per_s'), ',.0f')}) | "
                     f"{fmt(fl.get('fwdbwd_items_per_s'), ',.0f')} ({fmt(fl.get('cold_fwdbwd_items_per_s'), ',.0f')}) | "
                     f"{fmt(fl.get('cf_head_epoch_s'))} | {fmt(fl.get('floor_s'))} |")
    lines += ["", ("| workload | strategy | epoch (s) | how | speedup vs E2E | step (ms) | R_step | enc fwd items/s "
              "| enc bwd items/s | peak mem (GiB) | budget (GiB): estimate, caps fwd / bwd tokens | note |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["workloads"].items():
        for label in STRATEGIES:
            r = rec.get("strategies", {}).get(label)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {label} | - | - | - | - | - | - | - | "
                             f"{fmt(r.get('peak_memory_bytes') and r['peak_memory_bytes'] / GIB)} | - | {r['error']} |")
                continue
            how = (f"steady {r['steps_timed']} steps" if r["method"] == "steady"
                   else f"epoch {r['steps_run']}/{r['steps_per_epoch']} steps")
            note = r.get("short") or (f"partial ({r['partial_reason']}), extrapolated" if r.get("partial") else "")
            if r["method"] != "steady" and r.get("regressions"):
                note = (note + "; " if note else "") + f"{r['regressions']} regressions {r['regress_s']:.2f}s, init {r['init_s']:.2f}s"
            elif r["method"] != "steady":
                note = (note + "; " if note else "") + f"init {r['init_s']:.2f}s"
            if r.get("graph_captures"):
                note = (note + "; " if note else "") + f"{r['graph_captures']} graph captures {r['graph_capture_s']:.2f}s"
            step_ms = r.get("step_s", r.get("cf_step_s"))
            lines.append(f"| {name} | {label} | {r['epoch_s']:.2f} | {how} | {fmt(r.get('speedup_vs_e2e'), '.1f')}x | "
                         f"{fmt(step_ms and step_ms * 1000, '.1f')} | {fmt(r.get('R_step'))} | "
                         f"{r['fwd_items_per_s']:,.0f} | {r['bwd_items_per_s']:,.0f} | "
                         f"{fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / GIB)} | {budget_cell(r)} | {note} |")
    proj = [(n, r["full_scale_projection"]) for n, r in results["workloads"].items() if r.get("full_scale_projection")]
    if proj:
        lines += ["", ("| workload | full-scale interactions | R (full) | E2E epoch (s, projected) | GRAM-1E epoch (s, projected) "
                  "| speedup (projected) |"), "|---|---|---|---|---|---|"]
        for name, p in proj:
            lines.append(f"| {name} | {p['interactions']:,} | {p['R']:.1f} | {p['e2e_epoch_s']:,.0f} | "
                         f"{p['gram_1e_epoch_s']:,.1f} | {p['gram_1e_speedup']:.1f}x |")
    real = [(n, r["train"]) for n, r in results["workloads"].items() if r.get("train")]
    if real:
        lines += ["", ("| workload | strategy | best val | test metric | time to best (s) | wall (s) | epochs | "
                  "peak mem (GiB) |"), "|---|---|---|---|---|---|---|---|"]
        for name, runs in real:
            for label in STRATEGIES:
                r = runs.get(label)
                if not r:
                    continue
                if "error" in r:
                    lines.append(f"| {name} | {label} | - | - | - | - | - | {r['error']} |")
                    continue
                m = r["primary_metric"]
                lines.append(f"| {name} | {label} | {fmt(r['best_val'], '.4f')} | {m} {fmt(r['metrics'][m], '.4f')} | "
                             f"{fmt(r['time_to_best_s'], '.1f')} | {r['wall_time_s']:.1f} | {r['epochs_run']} | "
                             f"{fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / GIB)} |")
    lines += ["", "| target | workload | measured | threshold | status | detail |", "|---|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['workload']} | {t['measured']} | {t['threshold']} | **{t['status']}** | "
                     f"{t['detail']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=ALL_WORKLOADS, default=None,
                        help="default: all (smoke: the synthetic ones and kt-codeworkout)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--encoder-dir", default=None, help="local HF model dir (e.g. an fp16 MiniLM copy)")
    parser.add_argument("--random-encoder", action="store_true",
                        help="random BertModel of MiniLM's shape for the speed measurements (real-data training "
                             "still loads --encoder-dir)")
    parser.add_argument("--scale", nargs="*", help="fraction of interactions kept: 0.01 or toeic=0.01 poj=0.1")
    parser.add_argument("--batch-size", nargs="*", help="CF batch (same for every strategy): 32 or poj=16")
    parser.add_argument("--time-budget-s", type=float, default=530.0,
                        help="whole run from main() on (Python start-up and imports excluded)")
    parser.add_argument("--caps", nargs="*", help="per-workload caps in seconds: toeic=120 nr-mind=90")
    parser.add_argument("--steady-steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--max-epoch-steps", type=int, default=None,
                        help="cut whole epochs (and real-data training epochs) to this many steps; extrapolated")
    parser.add_argument("--encoder-batch-size", type=int, default=4096)
    parser.add_argument("--regress-batch-size", type=int, default=None, help="default: TrainSettings'")
    parser.add_argument("--regress-max-passes", type=int, default=None, help="default: TrainSettings' (4)")
    parser.add_argument("--encoder-batch-tokens", type=int, default=65536,
                        help="cap on tokens per encoder batch (TrainSettings.encoder_batch_tokens)")
    parser.add_argument("--encoder-memory-gib", nargs="*",
                        help="TrainSettings.encoder_memory_gib of every strategy: 1.5 or mind-title=1.52 nr-mind=1.55 "
                             "(token caps chosen to fit; the report shows each peak next to it)")
    parser.add_argument("--cf-step", choices=["auto", "eager", "graphed"], default="auto",
                        help="CF step of every strategy (TrainSettings.cf_step; auto = graphed on one GPU)")
    parser.add_argument("--encoder-step", choices=["auto", "eager", "graphed"], default="auto",
                        help="the encoder's training calls (TrainSettings.encoder_step; auto = CUDA graphs on a GPU)")
    parser.add_argument("--attention", choices=["auto", "packed", "padded"], default="auto",
                        help="encoder batch layout (TrainSettings.attention)")
    parser.add_argument("--freeze-bottom-layers", type=int, default=3,
                        help=f"{FROZEN}: GRAM-1E with this many bottom encoder layers frozen and cached")
    parser.add_argument("--floor-min-time", type=float, default=0.5, help="seconds per floor rate measurement")
    parser.add_argument("--forced-regress-items", type=int, default=2048,
                        help="a GRAM-1E epoch cut short times its regression on at most this many rows")
    parser.add_argument("--graph-check-tf32", action="store_true",
                        help="run the graphed-vs-eager check with TF32 as training has it (default: exact float32)")
    parser.add_argument("--disable-cudnn-sdpa", action="store_true",
                        help="torch.backends.cuda.enable_cudnn_sdp(False) for this run (cuDNN attention plans "
                             "every new batch shape; compare with the default)")
    parser.add_argument("--real-epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="no real-data training runs (time to best)")
    parser.add_argument("--zipf-exponent", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (smoke on CPU: 1, which avoids oversubscription stalls)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "train"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random encoder, tiny scale, 3 steps per strategy: checks every code path on CPU")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.steady_steps = min(args.steady_steps, 3)
        args.warmup_steps = min(args.warmup_steps, 1)
        args.max_epoch_steps = args.max_epoch_steps or 3
        args.floor_min_time = min(args.floor_min_time, 0.05)
        args.real_epochs = min(args.real_epochs, 2)
        args.encoder_batch_size = min(args.encoder_batch_size, 64)
        args.regress_batch_size = min(args.regress_batch_size or 128, 128)
        if args.workloads is None:
            args.workloads = ["mind-title", "toeic", "poj", "kt-codeworkout"]
        if args.cf_step == "auto":  # the CPU's auto is eager: smoke runs the static-shape step of every strategy
            args.cf_step = "graphed"
    args.workloads = args.workloads or list(ALL_WORKLOADS)
    return args


def main(argv: list[str] | None = None) -> dict:
    global _T0
    _T0 = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = _T0 + args.time_budget_s - RESERVE_S
    threads = torch.get_num_threads()
    if args.threads or (args.smoke and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled() if hasattr(torch.backends.cuda, "cudnn_sdp_enabled") else None
    if args.disable_cudnn_sdpa and cudnn_sdp is not None:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _main(args, device, out, deadline)
    finally:
        torch.set_num_threads(threads)
        if cudnn_sdp is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def _main(args: argparse.Namespace, device: torch.device, out: Path, deadline: float) -> dict:
    json_path, md_path = out / "train_bench.json", out / "train_bench.md"
    import transformers

    source = EncoderSource(args, device)
    meta = {
        "argv": args.argv, "device": str(device), "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "encoder": source.description, "encoder_params": source.params, "time_budget_s": args.time_budget_s,
        "steady_steps": args.steady_steps, "warmup_steps": args.warmup_steps,
        "encoder_batch_size": args.encoder_batch_size, "regress_batch_size": args.regress_batch_size,
        "regress_max_passes": args.regress_max_passes,
        "encoder_batch_tokens": args.encoder_batch_tokens, "attention": args.attention, "cf_step": args.cf_step,
        "encoder_step": args.encoder_step,
        "freeze_bottom_layers": args.freeze_bottom_layers, "encoder_memory_gib": args.encoder_memory_gib,
        "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled() if hasattr(torch.backends.cuda, "cudnn_sdp_enabled") else None,
        "smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results: dict = {"meta": meta, "workloads": {}, "targets": [], "skipped": []}
    skipped = results["skipped"]

    def save() -> None:
        results["meta"]["elapsed_s"] = time.perf_counter() - _T0
        json_path.write_text(json.dumps(results, indent=2, default=float))

    say(f"train_bench on {meta['device_name']} ({device}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}; encoder: {source.description}; budget {args.time_budget_s:.0f}s; "
        f"workloads {' '.join(args.workloads)}")
    tmp = Path(tempfile.mkdtemp(prefix="train_bench-"))
    try:
        tokenizer_dir = Path(args.encoder_dir) if args.encoder_dir else None
        train_encoder_dir = tokenizer_dir
        if args.smoke and any(w in REAL for w in args.workloads):
            train_encoder_dir = smoke_encoder_dir(source, tokenizer_dir, tmp)
            tokenizer_dir = train_encoder_dir
        caps = _parse_per_workload(args.caps, float)
        budget = Budget(deadline, {w: WORKLOAD_SHARES[w] for w in args.workloads}, fixed=caps)
        for name in args.workloads:
            cap = budget.take(name)
            if cap < (2 if args.smoke else 15):
                skipped.append(f"{name}: whole workload, only {cap:.0f}s left")
                say(f"{name}: SKIPPED (only {cap:.0f}s left)")
                continue
            run_workload(name, args, source, tokenizer_dir, train_encoder_dir, device, cap, results, tmp, save)
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plot = plot_time_to_best(results, out / "time_to_best.png") if not args.skip_train else None
    results["plot"] = plot
    results["targets"] = targets(results)
    save()
    text = tables(results)
    md_path.write_text(text + "\n")
    if skipped:
        print("\nSkipped or cut short:\n" + "\n".join(f"  - {s}" for s in skipped), flush=True)
    print(f"\nJSON: {json_path}\ntables: {md_path}" + (f"\nplot: {plot}" if plot else "") +
          f"\ntotal {time.perf_counter() - _T0:.0f}s\n", flush=True)
    print(text, flush=True)
    return results


def run_workload(name, args, source, tokenizer_dir, train_encoder_dir, device, cap, results, tmp, save) -> None:
    skipped = results["skipped"]
    started = time.perf_counter()
    say(f"=== {name}: cap {cap:.0f}s")
    if name in REAL:
        folder = Path(args.data_root) / REAL[name][1]
        if not folder.is_dir():
            skipped.append(f"{name}: data not found at {folder}")
            say(f"{name}: SKIPPED, data not found at {folder}")
            return
        try:
            workload = build_real_workload(name, args, source, tokenizer_dir, device)
        except Exception as error:  # noqa: BLE001 - missing data or tokenizer: skip this workload, keep the rest
            skipped.append(f"{name}: {type(error).__name__}: {error}")
            say(f"{name}: SKIPPED ({error})")
            return
    else:
        workload = build_synthetic_workload(name, args, source, device)
    record = {"kind": workload.kind, "task": workload.task_name, "info": workload.info, "strategies": {}}
    results["workloads"][name] = record
    record["epoch"] = workload.info["epoch"] = epoch_statistics(workload)
    e = record["epoch"]
    say(f"{name}: {e['items']:,} items (mean {e['mean_tokens']:.1f} tokens), {e['interactions']:,} interactions, "
        f"{e['occurrences']:,} occurrences, {e['unique_items']:,} unique -> R {e['R']:.1f}, R_occ "
        f"{e['R_occurrences']:.1f}; scale {workload.info['scale']:g}, batch {e['batch_size']}, "
        f"{e['steps_per_epoch']:,} steps/epoch (built in {time.perf_counter() - started:.1f}s)")
    shares = dict(REAL_STAGE_SHARES if workload.kind == "real" else SYNTH_STAGE_SHARES)
    if workload.kind != "real" or args.skip_train or not train_encoder_dir:
        shares.pop("train", None)
    shares = {k: v for k, v in shares.items() if k in ("floor", "train", "graph_check") or k in args.strategies}
    stages = Budget(started + cap, shares)
    floor_cap = stages.take("floor")
    say(f"{name} floor: start (cap {floor_cap:.0f}s)")
    record["floor"] = measure_floor(workload, source, device, args, floor_cap)
    f = record["floor"]
    say(f"{name} floor: forward {fmt(f['fwd_items_per_s'], ',.0f')} items/s (first pass "
        f"{fmt(f['cold_fwd_items_per_s'], ',.0f')}), forward+backward {fmt(f['fwdbwd_items_per_s'], ',.0f')} items/s "
        f"(first pass {fmt(f['cold_fwdbwd_items_per_s'], ',.0f')})")
    save()
    check_cap = stages.take("graph_check")
    if check_cap >= (0.5 if args.smoke else 3.0):
        try:
            record["graph_check"] = check_graphed(workload, source, device, args, check_cap)
        except Exception as error:
            text = failure_text(error)
            if text is None:
                raise
            record["graph_check"] = {"error": text}
            skipped.append(f"{name} graph check: {text}")
        save()
    else:
        skipped.append(f"{name} graph check: only {check_cap:.1f}s left")
    for label in RUN_ORDER[workload.kind]:
        if label not in args.strategies:
            continue
        stage_cap = stages.take(label)
        minimum = 0.5 if args.smoke else (3.0 if label in STEADY else 1.0)
        if stage_cap < minimum:
            skipped.append(f"{name} {label}: only {stage_cap:.1f}s left")
            say(f"{name} {label}: SKIPPED (only {stage_cap:.1f}s left)")
            continue
        run_strategy(workload, label, source, device, args, stage_cap, record["strategies"])
        result = record["strategies"][label]
        if result.get("short") or result.get("partial"):
            skipped.append(f"{name} {label}: " + (result.get("short") or f"partial epoch "
                           f"({result['steps_run']}/{result['steps_per_epoch']} steps, {result['partial_reason']}), extrapolated"))
        save()
    derive(workload, record)
    if "train" in shares:
        train_cap = stages.take("train")
        record["train"] = train_runs(workload, args, train_encoder_dir, device, train_cap, tmp, skipped)
    elif workload.kind == "real" and not args.skip_train:
        skipped.append(f"{name} train: no --encoder-dir for the real-data training runs")
    workload.epoch0 = None
    with contextlib.suppress(Exception):
        del workload
    reset_memory(device)
    say(f"=== {name}: done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    from gramrec.trainer.logs import configure_logging

    configure_logging()  # quiet JSON logs and no Hugging Face load reports (not done in-process: tests use caplog)
    main()
