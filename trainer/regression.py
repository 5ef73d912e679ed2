"""Multi-step GRAM's regression: fit the content encoder to the item table's rows, and measure how well it fitted.

Between regressions the CF loss moves each touched row away from its encoding, so `row - CE(c)` is the move the
CF loss asks of that item's embedding. The regression lowers the pseudo-loss 0.5 * sum ||row - CE(c)||^2 over the
touched rows: a pass of Adam steps over them in shuffled batches of `regress_batch_size` proposes a parameter move,
it is kept if it lowered the pseudo-loss on a fixed sample of the rows (float32), else a line search along its move
rescues a shorter one, else it is undone. Passes repeat until the pseudo-loss has fallen by `regress_fit`, or
`regress_max_passes` passes, or the time cap. The report says how far it got.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from gramrec.models.content_encoder import ContentEncoder, ItemTokens, batch_bounds
from gramrec.trainer.distributed import SINGLE, World, agree
from gramrec.trainer.encoder_graphs import GraphedPseudoLoss, row_buckets

UNTOUCHED_SAMPLE = 512  # untouched items encoded before and after, to see how far the regression moved them


@dataclass(frozen=True)
class TableRows:
    """Rows `items` of an [N, D] table, gathered as they are read: the regression's targets without a [K, D] copy
    (on mind-title a 0.12 GiB copy alive at GRAM-1E's peak; BENCHMARKS.md §3, sixth session). The table must not
    change while the regression runs (no CF step runs then)."""

    table: torch.Tensor  # [N, D]
    items: torch.Tensor  # [K] indices into table, on its device

    @property
    def device(self) -> torch.device:
        return self.table.device

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [k] positions among the K items -> [k, D]"""
        return self.table[self.items[rows]]


@dataclass
class RegressionReport:
    """What one regression did. Losses are 0.5 * sum ||row - CE(c)||^2 over the check rows (all touched rows, or a
    fixed random sample of them), with the encoder in float32: the measurement every accept/reject decision used."""

    rows: int  # touched rows regressed onto
    check_rows: int  # rows the decisions were measured on
    passes: int
    steps: int  # encoder optimizer steps, those of undone passes included
    rejected: int  # passes undone because they did not lower the pseudo-loss
    scale: float  # the last kept pass's length (1: as the optimizer left it; < 1: rescued; 0: none kept)
    loss_before: float
    loss_after: float
    fit: float  # 1 - after / before: share of the pseudo-loss removed
    toward: float  # <move made, move wanted> / ||move wanted||^2: share of the wanted distance covered along it
    cosine: float  # cosine between the encodings' move and the wanted move (the check rows as one vector)
    untouched_move: float  # mean ||CE_new - CE_old|| of untouched items / mean ||row - CE_old|| of checked ones
    param_change: float  # ||theta_new - theta_old|| / ||theta_old|| over the trained parameters
    lr_next: float  # the learning rate the next regression starts at
    seconds: float
    stopped: str  # "fit" (pseudo-loss fell by regress_fit), "passes" (regress_max_passes) or "time"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegressionPlan:
    """The regression's settings (see TrainSettings.regress_*)."""

    lr: float  # the encoder optimizer's learning rate (a regression whose passes all failed quarters it for the next)
    batch_items: int  # items per encoder optimizer step
    micro_items: int  # items per encoder call inside a step (the encoder's own caps apply too)
    fit: float
    max_passes: int
    max_seconds: float | None
    backtrack: bool = True  # undo a pass that raised the pseudo-loss
    line_search: bool = True  # rescue a pass that raised the pseudo-loss at a shorter length along its move
    check_items: int = 4096  # rows the decisions are measured on (0: every touched row)
    deadline: float | None = None  # time.perf_counter() value: the training run's own budget


def regress(
    encoder: ContentEncoder,
    tokens: ItemTokens,
    items: torch.Tensor,
    targets: torch.Tensor | TableRows,
    untouched: torch.Tensor,
    plan: RegressionPlan,
    optimizer: torch.optim.Optimizer,
    optimizer_step: Callable[[], None],
    check_encode: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    world: World = SINGLE,
    progress: bool = False,
    graphs: GraphedPseudoLoss | None = None,
) -> tuple[bool, RegressionReport]:
    """Fits `encoder` (in eval mode) to `targets` for `items`.

    items [K] (CPU) touched item indices; targets their rows ([K, D], or read from the table as they are needed);
    untouched [M] (CPU) a sample of other items; `optimizer_step` sums the ranks' gradients and steps `optimizer`;
    `check_encode` is the deterministic (eval, no grad) encoder pass in float32; `graphs`, when given, runs the
    encoder calls it accepts as replayed CUDA graphs (trainer/encoder_graphs.py). Returns whether a pass was kept
    (if not, the encoder is exactly as it was; if so, the caller re-encodes the items) and the report.

    Each pass is measured on the check rows (float32) and kept if it lowered the pseudo-loss there. A pass that
    raised it is rescued by a line search: its parameter move is a direction, and the parameters are set to
    start + s * (pass's move) with s = <wanted, made> / ||made||^2 (< 1), the minimum of the pseudo-loss along that
    move to first order (`made` measured on a short probe when the pass overshot). Measured on an H200
    (BENCHMARKS.md §3), an Adam pass at a fixed rate can move the encodings 0.8-6.6x as far as the rows ask, and
    was undone, pass after pass. A rescued pass still raising the loss is undone, and the rate quartered for later
    passes and regressions. The full pass goes first because a multi-step pass's curved path often ends where no
    point of its straight chord does (a single pass scaled this way fitted KT's rows 3.6x less than four full
    passes: BENCHMARKS.md §1). The check is float32 because bf16 autocast re-draws its rounding at every weight
    change, which hid gains under 1% (§3); a fixed sample keeps it cheap.
    """
    started = time.perf_counter()
    end = min(
        t
        for t in (plan.deadline, started + plan.max_seconds if plan.max_seconds else None, float("inf"))
        if t is not None
    )
    params = [p for p in encoder.parameters() if p.requires_grad]
    checked = _check_positions(len(items), plan.check_items, generator)
    check_items, check_targets = items[checked], targets[checked.to(targets.device)]
    start = _Start.measure(params, check_items, check_targets, untouched, check_encode)
    accepted = _host_copies(params)  # the last kept pass's parameters (host memory: see _host_copies)
    current, current_loss = start.encoded, start.loss
    lr = plan.lr
    passes, steps, rejected, kept, scale, stopped = 0, 0, 0, 0, 0.0, "passes"
    bar = tqdm(total=len(items) * plan.max_passes, desc="regression", unit="item", disable=not progress, leave=False)
    while passes < plan.max_passes:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for rows in _shuffled_chunks(items, tokens, plan.batch_items, generator, world):
            if agree(float(time.perf_counter() > end), world):
                stopped = "time"
                break
            _accumulate_gradients(encoder, tokens, items[rows], targets[rows.to(targets.device)], plan, graphs)
            optimizer_step()
            steps += 1
            bar.update(min(plan.batch_items, len(items)))
        passes += 1
        moved = check_encode(check_items)
        loss, pass_scale = float(0.5 * (check_targets - moved).pow(2).sum()), 1.0
        if loss >= current_loss and plan.backtrack and plan.line_search:  # rescue the pass at a shorter length
            pass_scale = _line_search(
                params, accepted, check_targets - current, current, moved, check_encode, check_items
            )
            if 0.0 < pass_scale < 1.0:
                moved = check_encode(check_items)
                loss = float(0.5 * (check_targets - moved).pow(2).sum())
        if pass_scale > 0.0 and (loss < current_loss or not plan.backtrack):
            current, current_loss, scale = moved, loss, min(pass_scale, 1.0)
            kept += 1
            for saved, param in zip(accepted, params):
                saved.copy_(param.detach(), non_blocking=True)
        else:  # this pass made the fit worse even scaled: undo it, and retry more gently
            with torch.no_grad():
                for saved, param in zip(accepted, params):
                    param.copy_(saved)
            optimizer.state.clear()
            rejected += 1
            lr /= 4
        bar.set_postfix(fit=f"{1 - current_loss / max(start.loss, 1e-30):.2f}", lr=f"{lr:.1e}")
        if stopped == "time":
            break
        if current_loss <= (1.0 - plan.fit) * start.loss:
            stopped = "fit"
            break
    bar.close()
    for group in optimizer.param_groups:
        group["lr"] = plan.lr
    seconds = time.perf_counter() - started
    report = start.report(
        params, current, check_targets, check_encode, passes, steps, rejected, scale, lr, seconds, stopped, len(items)
    )
    return kept > 0, report


def _check_positions(count: int, check_items: int, generator: torch.Generator) -> torch.Tensor:
    """Positions into the touched rows that decisions are measured on: all of them, or a fixed random sample."""
    if check_items <= 0 or check_items >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:check_items].sort().values


def _host_copies(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `params` in host memory (pinned when they are on a GPU, so the copies back and forth overlap).

    Why the host: the snapshot is read only when a pass is undone or line-searched, a few times a regression, and on
    the GPU it would hold a second copy of every trained weight (91 MB for MiniLM) through the whole run, where
    multi-step GRAM's peak on short texts is mostly such fixed parts (trainer/memory_budget.py)."""
    pin = any(p.is_cuda for p in params)
    copies = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in params]
    for snapshot, param in zip(copies, params, strict=True):
        snapshot.copy_(param.detach(), non_blocking=True)
    if pin:
        torch.cuda.current_stream().synchronize()  # the next step writes the parameters
    return copies


def _line_search(params, start, wanted, encoded, moved, check_encode, check_items) -> float:
    """Scales the pass's parameter move (params - start) to the least-squares length for the check rows, measured
    in the linear regime: when the whole pass moved the encodings further than half the wanted distance, the
    direction's effect is probed at a fraction of the move that keeps it short. Leaves params at the chosen point
    (start + scale * move, scale < 1) or where the pass left them (scale >= 1); 0: no length helps."""
    made = moved - encoded
    made_norm = float(made.norm())
    probe = 0.5 * float(wanted.norm()) / made_norm if made_norm > 0 else 1.0
    if probe >= 1.0:  # the pass stayed short: its own move is the linear one
        scale = _line_search_scale(wanted, made)
        if 0.0 < scale < 1.0:
            _scale_move(params, start, scale)
        return scale
    # The pass overshot: its own length says little about its direction near the start, so probe a short move.
    _scale_move(params, start, probe)
    scale = min(probe * _line_search_scale(wanted, check_encode(check_items) - encoded), 1.0)
    _scale_move(params, start, scale / probe if scale > 0 else 0.0)
    return scale


def _line_search_scale(wanted: torch.Tensor, made: torch.Tensor) -> float:
    """argmin_s ||wanted - s * made||^2 = <wanted, made> / ||made||^2; 0 when the move points away (or is none)."""
    made_sq = float(made.double().pow(2).sum())
    along = float((wanted.double() * made.double()).sum())
    if made_sq <= 0.0 or along <= 0.0:
        return 0.0
    return along / made_sq


@torch.no_grad()
def _scale_move(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor], scale: float) -> None:
    """Parameters to start + scale * (parameters - start)."""
    for param, origin in zip(params, start):
        origin = origin.to(param.device, non_blocking=True)  # one parameter's worth on the GPU at a time
        param.sub_(origin).mul_(scale).add_(origin)


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
    encoder: ContentEncoder,
    tokens: ItemTokens,
    chunk: torch.Tensor,
    targets: torch.Tensor,
    plan: RegressionPlan,
    graphs: GraphedPseudoLoss | None = None,
) -> None:
    """Back-propagates the pseudo-loss of `chunk` micro-batch by micro-batch (one graph alive at a time, so peak
    memory follows the encoder's token cap)."""
    device = targets.device
    for lo, hi in _micro_batches(encoder, tokens.lengths[chunk], plan.micro_items, graphs is not None, device):
        if graphs is not None and graphs.accepts(tokens, chunk[lo:hi], encoder.batch_tokens):
            graphs.accumulate(tokens, chunk[lo:hi], targets[lo:hi])
            continue
        predicted = encoder.encode(tokens, chunk[lo:hi], plan.micro_items)  # [b, D]
        loss = 0.5 * (predicted - targets[lo:hi]).pow(2).sum()
        loss.backward()
        # Free this call's autograd graph now: a graph capture later in this loop must not find the AccumulateGrad
        # nodes it made on the default stream alive (measured on an H100: the capture is invalidated, and the failed
        # capture leaves CUDA's RNG unusable for the rest of the process).
        del predicted, loss


def _micro_batches(
    encoder: ContentEncoder, sorted_lengths: torch.Tensor, micro_items: int, graphed: bool, device: torch.device
) -> list[tuple[int, int]]:
    """[start, end) micro-batches of a chunk sorted by length, within the encoder's caps. With graphs, the texts short
    enough for a padded call are cut as a graph runs them (B texts in row_bucket(B) rows), so each fits the token cap
    that GraphedPseudoLoss.accepts checks and is replayed: cut by real rows, a micro-batch near a tight cap (a memory
    budget) overflowed its bucket and ran eagerly. The longer texts are cut as encode() runs them."""
    packed = encoder.uses_packed(device, autocast=True)
    cap = encoder.batch_tokens
    if not graphed:
        return batch_bounds(sorted_lengths, micro_items, cap, packed)
    short = _padded_prefix(encoder, sorted_lengths, device)
    head = batch_bounds(sorted_lengths[:short], micro_items, cap, packed=False, rows=row_buckets)
    tail = batch_bounds(sorted_lengths[short:], micro_items, cap, packed)
    return head + [(short + lo, short + hi) for lo, hi in tail]


def _padded_prefix(encoder: ContentEncoder, sorted_lengths: torch.Tensor, device: torch.device) -> int:
    """How many of the (ascending) lengths encode() would run padded, not packed (uses_packed grows with length)."""
    lo, hi = 0, len(sorted_lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        if encoder.uses_packed(device, autocast=True, max_length=int(sorted_lengths[mid])):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters as one flat host vector (read once before and once after the regression, for its report)."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in params])


@dataclass
class _Start:
    """What the regression measured before its first step, on the check rows, for its decisions and report."""

    flat_params: torch.Tensor  # the trained parameters, flattened
    encoded: torch.Tensor  # [C, D] the check rows' encodings
    wanted: torch.Tensor  # [C, D] targets - encoded: the move the CF loss asks of each
    untouched: torch.Tensor  # [M] a sample of other items
    untouched_encoded: torch.Tensor | None  # [M, D]

    @classmethod
    def measure(cls, params, items, targets, untouched, encode) -> _Start:
        encoded = encode(items)
        return cls(_flat(params), encoded, targets - encoded, untouched, encode(untouched) if len(untouched) else None)

    @property
    def loss(self) -> float:
        return float(0.5 * self.wanted.pow(2).sum())

    def report(
        self, params, current, targets, encode, passes, steps, rejected, scale, lr_next, seconds, stopped, rows
    ) -> RegressionReport:
        wanted, made = self.wanted, current - self.encoded
        loss_after = float(0.5 * (targets - current).pow(2).sum())
        wanted_sq = float(wanted.pow(2).sum())
        along = float((made * wanted).sum())
        untouched_move = 0.0
        if self.untouched_encoded is not None and float(made.abs().max()) > 0:
            moved = (encode(self.untouched) - self.untouched_encoded).norm(dim=1).mean()
            untouched_move = float(moved) / max(float(wanted.norm(dim=1).mean()), 1e-30)
        change = float((_flat(params) - self.flat_params).norm()) / max(float(self.flat_params.norm()), 1e-30)
        return RegressionReport(
            rows=rows,
            check_rows=len(wanted),
            passes=passes,
            steps=steps,
            rejected=rejected,
            scale=scale,
            loss_before=self.loss,
            loss_after=loss_after,
            fit=1.0 - loss_after / max(self.loss, 1e-30),
            toward=along / max(wanted_sq, 1e-30),
            cosine=along / max(float(made.norm()) * wanted_sq**0.5, 1e-30),
            untouched_move=untouched_move,
            param_change=change,
            lr_next=lr_next,
            seconds=seconds,
            stopped=stopped,
        )
