"""The training loop: one linear function, early stopping on validation, test metrics of the best checkpoint."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gramrec.models.content_encoder import (
    ContentEncoder,
    ItemTokens,
    default_encoder_dir,
    load_tokenizer,
)
from gramrec.trainer.checkpoint import (
    CheckpointMeta,
    load_optimizers,
    load_weights,
    read_config,
    read_items,
    save_checkpoint,
)
from gramrec.trainer.distributed import (
    SINGLE,
    World,
    agree,
    barrier,
    global_sum,
    init_from_env,
)
from gramrec.trainer.graphed_step import StaticCFStep
from gramrec.trainer.known_rows import KnownRows
from gramrec.trainer.kt_task import KnowledgeTracingTask
from gramrec.trainer.nr_task import NewsTask
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.static_batches import StaticBatch
from gramrec.trainer.strategies import Strategy, make_strategy

log = logging.getLogger("gramrec.train")


def resolve_device(name: str) -> torch.device:
    """'auto': this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def make_task(settings: TrainSettings):
    return KnowledgeTracingTask(settings) if settings.task == "kt" else NewsTask(settings)


@dataclass
class Run:
    """Everything a training run holds, built once from settings (and a checkpoint's encoder, if any)."""

    settings: TrainSettings
    device: torch.device
    task: KnowledgeTracingTask | NewsTask
    tokenizer: object
    encoder: ContentEncoder
    tokens: ItemTokens
    head: nn.Module
    strategy: Strategy
    setup_s: float  # building the strategy: the initial encoding of all items, part of training time
    world: World = SINGLE
    static_step: StaticCFStep | None = None  # the graphed CF step (settings.cf_step), None for the eager one


def static_step_for(strategy: Strategy, task, settings: TrainSettings, device: torch.device) -> StaticCFStep | None:
    if not strategy.static_step:
        return None
    return StaticCFStep(strategy, task, settings.batch_size, device, strategy.encoder.dim)


def build_run(
    settings: TrainSettings,
    encoder_dir: Path | None = None,
    world: World = SINGLE,
    known_rows: KnownRows | None = None,
) -> Run:
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    task = make_task(settings)
    encoder_dir = encoder_dir or settings.encoder_dir or default_encoder_dir()
    tokenizer = load_tokenizer(encoder_dir)
    assert settings.pooling is not None and settings.max_tokens is not None  # filled per task by TrainSettings
    encoder = ContentEncoder.from_pretrained(encoder_dir, pooling=settings.pooling).to(device)
    tokens = ItemTokens.from_texts(tokenizer, task.items.texts, settings.max_tokens)
    head = task.build_head(encoder.dim).to(device)
    steps = task.steps_per_epoch()
    if settings.max_steps_per_epoch:
        steps = min(steps, settings.max_steps_per_epoch)
    started = time.perf_counter()
    initial = known_rows.aligned(task.items, encoder.dim) if known_rows is not None else None
    strategy = make_strategy(encoder, tokens, head, settings, steps, world, initial)  # GRAM/NoFinetune encode items
    setup_s = time.perf_counter() - started
    static_step = static_step_for(strategy, task, settings, device)
    return Run(settings, device, task, tokenizer, encoder, tokens, head, strategy, setup_s, world, static_step)


def train_step(run: Run, batch, world: World = SINGLE) -> torch.Tensor:
    """One update. Under torchrun `batch` is this rank's shard; the loss is normalised by the global target count
    (and gradients are summed across ranks in the strategy), so the update is the one of the whole global batch.

    With the graphed CF step, `batch` is best a StaticBatch from run.static_step.prepare (padded and on the device
    before the loop); a plain batch is padded here."""
    if run.static_step is not None:
        if not isinstance(batch, StaticBatch):
            batch = run.static_step.prepare([batch])[0]
        return run.static_step.step(batch)  # prepare() put it on the device
    batch = batch.to(run.device)
    embeddings = run.strategy.embed(batch.occurrences)  # [I, D]
    embeddings = torch.cat([embeddings, embeddings.new_zeros(1, embeddings.shape[1])])  # padding row
    total, count = run.task.loss_terms(run.head, embeddings, batch)
    loss = total / global_sum(count.to(total.dtype), world)
    loss.backward()
    run.strategy.finish_step()
    return loss.detach()


def evaluate(run: Run, split: str) -> dict:
    run.head.eval()
    table = run.strategy.item_table(run.task.eval_items(split))
    metrics = run.task.evaluate(run.head, table, split)
    run.head.train()
    return metrics


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def save(run: Run, path: Path, meta: CheckpointMeta, resumable: bool) -> None:
    """Rank 0 writes; every rank waits for it, so all can read the checkpoint afterwards."""
    if run.world.is_main:
        _save(run, path, meta, resumable)
    barrier(run.world)


def _save(run: Run, path: Path, meta: CheckpointMeta, resumable: bool) -> None:
    save_checkpoint(
        path,
        meta,
        run.encoder,
        run.tokenizer,
        run.head,
        run.task.items,
        run.strategy.state_tensors(),
        optimizers=run.strategy.optimizers if resumable else None,
        loop_tensors={"rng_cpu": torch.get_rng_state()} if resumable else None,
    )


def restore(run: Run, path: Path, with_optimizers: bool) -> dict:
    """Loads weights and strategy state; with_optimizers also restores optimizers and the RNG (resuming)."""
    config = read_config(path)
    tensors = load_weights(path, run.encoder, run.head)
    run.strategy.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("loop.")})
    if with_optimizers:
        load_optimizers(path, config, run.strategy.optimizers)
        torch.set_rng_state(tensors["loop.rng_cpu"])
    return config


def warm_start(run: Run, checkpoint: Path, item_state: bool = True) -> None:
    """Takes the checkpoint's head (the encoder came with build_run) and, for the same catalog, its item state.

    A retrain's catalog usually grew (items added through the API), or the checkpoint came from another strategy:
    then the strategy keeps the item state it built with the warm encoder, which is what GRAM starts from anyway.
    """
    tensors = load_weights(checkpoint, run.encoder, run.head)
    saved = read_config(checkpoint)["settings"]
    same_strategy = (saved["strategy"], saved["period"]) == (run.settings.strategy, run.settings.period)
    if item_state and same_strategy and read_items(checkpoint).ids == run.task.items.ids:
        run.strategy.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("loop.")})
    log.info("warm start", extra={"from": str(checkpoint)})


class EncoderDrift:
    """How far the encoder's trained parameters moved from where this run began: ||theta - theta_0|| / ||theta_0||.
    Compares how much each strategy really fine-tunes (a copy of the parameters, on their device)."""

    def __init__(self, encoder: ContentEncoder | None):
        self.params = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
        self.start = [p.detach().clone() for p in self.params]
        squares = [(p.double() ** 2).sum() for p in self.start]
        self.norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    def relative_change(self) -> float:
        if not self.params:
            return 0.0
        moved = torch.stack([((p.detach() - p0).double() ** 2).sum() for p, p0 in zip(self.params, self.start)])
        return float(moved.sum().sqrt()) / max(self.norm, 1e-30)


def train(
    settings: TrainSettings,
    on_epoch: Callable[[Run, int], None] | None = None,
    known_rows: KnownRows | None = None,
) -> dict:
    """Trains, early-stops on validation, evaluates the best checkpoint on test, writes report.json.

    `on_epoch(run, epoch)` runs after each epoch's validation (benchmarks' diagnostics; it must not train).
    `known_rows`: with `init_from`, that checkpoint's exported item table, GRAM's starting rows (trainer/known_rows.py).
    """
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_config = read_config(settings.resume) if settings.resume else None
    world = init_from_env(resolve_device(settings.device))
    start_from = settings.resume or settings.init_from
    encoder_dir = (Path(start_from) / "encoder") if start_from else None
    run = build_run(settings, encoder_dir, world, known_rows if settings.init_from and not settings.resume else None)
    setup_items_encoded = run.encoder.items_forward  # the starting table's encodings (see known_rows)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    start_epoch, global_step, best, history, bad_epochs = 0, 0, float("-inf"), [], 0
    if resume_config and settings.resume:
        restore(run, settings.resume, with_optimizers=True)
        start_epoch, global_step = resume_config["epoch"] + 1, resume_config["global_step"]
        best, history = resume_config["best_metric"] or float("-inf"), resume_config["history"]
        bad_epochs = epochs_since_best(history, run.task.primary_metric)
        log.info("resumed", extra={"from": str(settings.resume), "epoch": start_epoch})
    elif settings.init_from:
        warm_start(run, Path(settings.init_from), item_state=known_rows is None)

    interactions = run.task.interactions()
    metric = run.task.primary_metric
    started = time.perf_counter() - (0.0 if resume_config else run.setup_s)
    io_seconds, time_to_best, best_epoch = 0.0, None, None
    out_of_time = False
    drift, reported = EncoderDrift(run.encoder if run.strategy.finetunes_encoder else None), 0
    settings_json = json.loads(settings.model_dump_json())
    for epoch in range(start_epoch, settings.epochs):
        batches = run.task.train_batches(np.random.default_rng([settings.seed, epoch]), world)
        batches = batches[: settings.max_steps_per_epoch] if settings.max_steps_per_epoch else batches
        steps = run.static_step.stream(batches) if run.static_step is not None else iter(batches)
        show = settings.progress and world.is_main
        bar = tqdm(
            steps, total=len(batches), desc=f"epoch {epoch + 1}/{settings.epochs}", unit="step", disable=not show
        )
        losses = []
        for batch in bar:
            if settings.time_budget_s:  # honoured inside a multi-step GRAM regression too
                run.strategy.deadline = started + io_seconds + settings.time_budget_s
            losses.append(train_step(run, batch, world))
            global_step += 1
            if show and global_step % 10 == 0:
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(loss=f"{float(losses[-1]):.4f}", items_s=f"{run.encoder.items_forward / elapsed:.0f}")
            if settings.time_budget_s:
                over = time.perf_counter() - started - io_seconds > settings.time_budget_s
                if agree(float(over), world):
                    out_of_time = True
                    break
        if not out_of_time:
            run.strategy.end_epoch()
        val = evaluate(run, "val")
        val[metric] = agree(val[metric] if val[metric] is not None else float("-inf"), world)
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        history.append(
            {
                "epoch": epoch,
                "step": global_step,
                "train_loss": train_loss,
                "val": val,
                "elapsed_s": time.perf_counter() - started - io_seconds,
                "encoder_change": drift.relative_change(),
                "regressions": [r.as_dict() for r in run.strategy.reports[reported:]],
            }
        )
        reported = len(run.strategy.reports)
        log.info("epoch", extra={"epoch": epoch, "train_loss": train_loss, "val": val})
        if on_epoch is not None:
            on_epoch(run, epoch)
        meta = CheckpointMeta(settings_json, epoch, global_step, max(best, val[metric]), val, history)
        io_start = time.perf_counter()
        if val[metric] > best:
            best, best_epoch, bad_epochs = val[metric], epoch, 0
            time_to_best = io_start - started - io_seconds
            save(run, out / "best", meta, resumable=False)
        else:
            bad_epochs += 1
        save(run, out / "last", meta, resumable=True)
        io_seconds += time.perf_counter() - io_start
        if bad_epochs >= settings.patience or out_of_time:
            break

    wall = time.perf_counter() - started
    if (out / "best").exists():
        restore(run, out / "best", with_optimizers=False)
    test = evaluate(run, "test")
    report = {
        "task": settings.task,
        "strategy": settings.label,
        "metrics": test,
        "best_val": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "steps": global_step,
        "wall_time_s": wall - io_seconds,
        "time_to_best_s": time_to_best,
        "checkpoint_io_s": io_seconds,
        "encoder_items_forward": run.encoder.items_forward,
        "encoder_items_backward": run.encoder.items_backward,
        "setup_items_encoded": setup_items_encoded,
        "interactions_per_epoch": interactions,
        "items": len(run.task.items),
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "device": str(run.device),
        "history": history,
        "settings": settings_json,
    }
    report["world_size"] = world.size
    if world.is_main:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def epochs_since_best(history: list[dict], metric: str) -> int:
    """Validations after the best one: a resumed run continues the same early-stopping count."""
    scores = [entry["val"][metric] for entry in history]
    return len(scores) - 1 - scores.index(max(scores)) if scores else 0
