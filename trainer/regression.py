"""Multi-step GRAM's regression: fit the content encoder to the item table's rows, and measure how well it fitted.

Between regressions the CF loss moves each touched row away from its encoding, so `row - CE(c)` is the move the
CF loss asks of that item's embedding. The regression minimises the pseudo-loss 0.5 * sum ||row - CE(c)||^2 over
the touched rows, pass after pass over them in shuffled batches of `regress_batch_size`, until the pseudo-loss has
fallen by `regress_fit` (measured exactly after each pass), or `regress_max_passes` passes, or the
time cap. A single pass of one Adam step per batch moves the encoder a fixed distance per step whatever the
targets' size: too little when they are far, pure noise when they are near. Passing until the pseudo-loss has
fallen, undoing any pass that raised it and retrying at a lower rate, makes the encoder go where the rows are, and
the report says how far it got.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from gramrec.models.content_encoder import ContentEncoder, ItemTokens, batch_bounds
from gramrec.trainer.distributed import SINGLE, World, agree

UNTOUCHED_SAMPLE = 512  # untouched items encoded before and after, to see how far the regression moved them


@dataclass
class RegressionReport:
    """What one regression did. Losses are 0.5 * sum ||row - CE(c)||^2 over the touched rows."""

    rows: int  # touched rows regressed onto
    passes: int
    steps: int  # encoder optimizer steps, those of undone passes included
    rejected: int  # passes undone because they did not lower the pseudo-loss
    loss_before: float
    loss_after: float
    fit: float  # 1 - after / before: share of the pseudo-loss removed
    toward: float  # <move made, move wanted> / ||move wanted||^2: share of the wanted distance covered along it
    cosine: float  # cosine between the encodings' move and the wanted move (all touched rows as one vector)
    untouched_move: float  # mean ||CE_new - CE_old|| of untouched items / mean ||row - CE_old|| of touched ones
    param_change: float  # ||theta_new - theta_old|| / ||theta_old|| over the trained parameters
    seconds: float
    stopped: str  # "fit" (pseudo-loss fell by regress_fit), "passes" (regress_max_passes) or "time"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegressionPlan:
    """The regression's settings (see TrainSettings.regress_*)."""

    lr: float  # the encoder optimizer's learning rate at the start of each regression
    batch_items: int  # items per encoder optimizer step
    micro_items: int  # items per encoder call inside a step (the encoder's own caps apply too)
    fit: float
    max_passes: int
    max_seconds: float | None
    backtrack: bool = True  # undo a pass that raised the pseudo-loss, retry at lr / 4
    deadline: float | None = None  # time.perf_counter() value: the training run's own budget


def regress(
    encoder: ContentEncoder,
    tokens: ItemTokens,
    items: torch.Tensor,
    targets: torch.Tensor,
    untouched: torch.Tensor,
    plan: RegressionPlan,
    optimizer: torch.optim.Optimizer,
    optimizer_step: Callable[[], None],
    encode: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    world: World = SINGLE,
    progress: bool = False,
) -> tuple[torch.Tensor, RegressionReport]:
    """Fits `encoder` (in eval mode) to `targets` for `items`.

    items [K] (CPU) touched item indices; targets [K, D] their rows; untouched [M] (CPU) a sample of other items;
    `optimizer_step` sums the ranks' gradients and steps `optimizer`; `encode` is the deterministic (eval, no grad)
    encoder pass. Returns the items' new encodings [K, D] and the report.

    Each pass is followed by an exact measurement of the pseudo-loss. A pass that did not lower it is undone
    (parameters restored, optimizer state cleared) and retried at a quarter of the learning rate: an adaptive
    optimizer's step has a fixed size whatever the targets' distance, so rows only slightly moved need a smaller
    rate than rows far away, and the regression never leaves its fit worse than it found it.
    """
    started = time.perf_counter()
    end = min(
        t
        for t in (plan.deadline, started + plan.max_seconds if plan.max_seconds else None, float("inf"))
        if t is not None
    )
    params = [p for p in encoder.parameters() if p.requires_grad]
    # The starting point is measured with the same `encode(items)` call as every pass's result: same batches, so
    # the same rounding. The rows' own encodings were computed in other batches, and under bf16 autocast that
    # difference alone can exceed a small step's gain, which would reject every pass (seen on an H200).
    start = _Start.measure(params, items, targets, untouched, encode)
    accepted = [p.detach().clone() for p in params]
    loss_before = start.loss
    best, best_loss = start.encoded, loss_before
    lr = plan.lr
    passes, steps, rejected, stopped = 0, 0, 0, "passes"
    bar = tqdm(total=len(items) * plan.max_passes, desc="regression", unit="item", disable=not progress, leave=False)
    while passes < plan.max_passes:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for rows in _shuffled_chunks(items, tokens, plan.batch_items, generator, world):
            if agree(float(time.perf_counter() > end), world):
                stopped = "time"
                break
            _accumulate_gradients(encoder, tokens, items[rows], targets[rows.to(targets.device)], plan)
            optimizer_step()
            steps += 1
            bar.update(min(plan.batch_items, len(items)))
        passes += 1
        current = encode(items)  # every rank encodes every item: the same decision everywhere
        loss = float(0.5 * (targets - current).pow(2).sum())
        if loss < best_loss or not plan.backtrack:
            best, best_loss = current, loss
            for saved, param in zip(accepted, params):
                saved.copy_(param.detach())
        else:  # this pass made the fit worse: undo it, and retry more gently
            with torch.no_grad():
                for saved, param in zip(accepted, params):
                    param.copy_(saved)
            optimizer.state.clear()
            rejected += 1
            lr /= 4
        bar.set_postfix(fit=f"{1 - best_loss / max(loss_before, 1e-30):.2f}", lr=f"{lr:.1e}")
        if stopped == "time":
            break
        if best_loss <= (1.0 - plan.fit) * loss_before:
            stopped = "fit"
            break
    bar.close()
    for group in optimizer.param_groups:
        group["lr"] = plan.lr
    seconds = time.perf_counter() - started
    report = start.report(params, best, targets, encode, passes, steps, rejected, seconds, stopped)
    return best, report


def _shuffled_chunks(
    items: torch.Tensor, tokens: ItemTokens, batch_items: int, generator: torch.Generator, world: World
):
    """One pass: positions into `items`, shuffled into batches of `batch_items`, each sorted by text length
    (micro-batches of like lengths) and cut to this rank's share (the optimizer step sums the ranks' gradients)."""
    order = torch.randperm(len(items), generator=generator)
    for start in range(0, len(order), batch_items):
        rows = order[start : start + batch_items]
        rows = rows[torch.argsort(tokens.lengths[items[rows]], stable=True)]
        yield rows[world.rank :: world.size]


def _accumulate_gradients(
    encoder: ContentEncoder, tokens: ItemTokens, chunk: torch.Tensor, targets: torch.Tensor, plan: RegressionPlan
) -> None:
    """Back-propagates the pseudo-loss of `chunk` micro-batch by micro-batch (one graph alive at a time, so peak
    memory follows the encoder's token cap)."""
    device = targets.device
    packed = encoder.uses_packed(device, autocast=True)
    for lo, hi in batch_bounds(tokens.lengths[chunk], plan.micro_items, encoder.batch_tokens, packed):
        predicted = encoder.encode(tokens, chunk[lo:hi], plan.micro_items)  # [b, D]
        loss = 0.5 * (predicted - targets[lo:hi]).pow(2).sum()
        loss.backward()


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


@dataclass
class _Start:
    """What the regression measured before its first step, for the report."""

    flat_params: torch.Tensor  # the trained parameters, flattened
    encoded: torch.Tensor  # [K, D] the touched items' encodings
    wanted: torch.Tensor  # [K, D] targets - encoded: the move the CF loss asks of each
    untouched: torch.Tensor  # [M] a sample of other items
    untouched_encoded: torch.Tensor | None  # [M, D]

    @classmethod
    def measure(cls, params, items, targets, untouched, encode) -> _Start:
        encoded = encode(items)
        return cls(_flat(params), encoded, targets - encoded, untouched, encode(untouched) if len(untouched) else None)

    @property
    def loss(self) -> float:
        return float(0.5 * self.wanted.pow(2).sum())

    def report(self, params, best, targets, encode, passes, steps, rejected, seconds, stopped) -> RegressionReport:
        wanted, made = self.wanted, best - self.encoded
        loss_after = float(0.5 * (targets - best).pow(2).sum())
        wanted_sq = float(wanted.pow(2).sum())
        along = float((made * wanted).sum())
        untouched_move = 0.0
        if self.untouched_encoded is not None and float(made.abs().max()) > 0:
            moved = (encode(self.untouched) - self.untouched_encoded).norm(dim=1).mean()
            untouched_move = float(moved) / max(float(wanted.norm(dim=1).mean()), 1e-30)
        change = float((_flat(params) - self.flat_params).norm()) / max(float(self.flat_params.norm()), 1e-30)
        return RegressionReport(
            rows=len(wanted),
            passes=passes,
            steps=steps,
            rejected=rejected,
            loss_before=self.loss,
            loss_after=loss_after,
            fit=1.0 - loss_after / max(self.loss, 1e-30),
            toward=along / max(wanted_sq, 1e-30),
            cosine=along / max(float(made.norm()) * wanted_sq**0.5, 1e-30),
            untouched_move=untouched_move,
            param_change=change,
            seconds=seconds,
            stopped=stopped,
        )
