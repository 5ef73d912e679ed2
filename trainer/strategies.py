"""How item embeddings are produced during training and how the content encoder learns from the CF loss.

Every strategy follows the same step, driven by the training loop:

    occurrence_embeddings = strategy.embed(batch.occurrences)   # [I, D], one row per interaction
    total, count = task.loss_terms(head, occurrence_embeddings (+ a zero padding row), batch)
    (total / global count of targets).backward()
    strategy.finish_step()                                        # optimizer steps, GRAM bookkeeping

With cf_step=graphed (trainer/graphed_step.py) the CF part of that step (finish_step's "cf" update, and for
table strategies the embedding too, through static_rows / static_row_grads) is replayed as a CUDA graph, and
finish_items / after_step do the rest eagerly.

E2E runs the encoder once per interaction. GRAM runs it once per unique item: the unique items' embeddings
become leaf tensors, so autograd sums the gradients of repeated items into one row per item (dL/dh).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.trainer.distributed import SINGLE, World, all_gather_rows, sum_gradients
from gramrec.trainer.encoder_graphs import GraphedPseudoLoss, GraphedTrainEncode
from gramrec.trainer.memory_budget import REENCODE_CHUNK, MemoryPlan, plan_for_strategy
from gramrec.trainer.regression import UNTOUCHED_SAMPLE, RegressionPlan, RegressionReport, TableRows, regress
from gramrec.trainer.settings import TrainSettings

log = logging.getLogger("gramrec.train")


Optimizers = dict[str, tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]


def make_optimizer(
    kind: str, params, lr: float, warmup_steps: int, device: torch.device, capturable: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam (or plain SGD) with linear warm-up to a constant learning rate; fused Adam kernels on CUDA.

    capturable: Adam keeps its step count on the device, so a CUDA graph can replay its step (the graphed CF
    step then also holds the learning rate in a device tensor, which the scheduler fills in place)."""
    params = list(params)
    optimizer: torch.optim.Optimizer
    if kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, fused=device.type == "cuda", capturable=capturable)
    # Linear warm-up from lr/(warmup+1) (not from 0, which would waste the first step) to a constant lr.
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    return optimizer, warmup


def encoder_graphs_on(settings: TrainSettings, device: torch.device) -> bool:
    """Whether multi-step GRAM's regression replays CUDA graphs (settings.encoder_step: graphed, or auto on a GPU)."""
    return settings.encoder_step == "graphed" or (settings.encoder_step == "auto" and device.type == "cuda")


class Strategy:
    """Base class: the CF head always trains with Adam; subclasses decide how items are embedded."""

    finetunes_encoder = False
    # Whether the encoder runs with dropout outside inference. Set explicitly for every strategy: from_pretrained
    # returns the backbone in eval mode while a new ContentEncoder says training, so without it the first
    # inference encode would silently switch dropout on halfway through the first epoch.
    encoder_train_mode = False
    # For the memory budget (trainer/memory_budget.py): [N, D] item tables the strategy keeps, and whether its
    # training encodes can be bounded (multi-step GRAM's regression back-propagates micro-batch by micro-batch; an
    # E2E or GRAM-1S step keeps the graph of all its items until the loss's backward, whatever the caps).
    item_tables = 0
    bounded_backward = False
    uses_encoder = True

    def __init__(
        self,
        encoder: ContentEncoder,
        tokens: ItemTokens,
        head: nn.Module,
        settings: TrainSettings,
        steps_per_epoch: int,
        world: World = SINGLE,
    ):
        self.encoder = encoder
        self.tokens = tokens
        self.head = head
        self.settings = settings
        self.device = next(head.parameters()).device
        self.num_items = len(tokens)
        self.steps_per_epoch = steps_per_epoch
        self.world = world
        self.reports: list[RegressionReport] = []  # multi-step GRAM's regressions, in order
        self.deadline: float | None = None  # time.perf_counter() by which training must end (the run's budget)
        # The static-shape CF step (trainer/graphed_step.py): on for cf_step=graphed, and for auto on one GPU.
        single_gpu = self.device.type == "cuda" and world.size == 1
        self.static_step = world.size == 1 and (
            settings.cf_step == "graphed" or (settings.cf_step == "auto" and single_gpu)
        )
        self._configure_encoder()
        self.encoder.train(self.encoder_train_mode)
        self.head.train()
        self.optimizers: Optimizers = {
            "cf": make_optimizer(  # lr and warm-up scaled with the CF batch by settings.cf_lr_scaling
                settings.optimizer,
                self.cf_parameters(),
                settings.cf_lr,
                settings.cf_warmup_steps,
                self.device,
                capturable=self.static_step and self.device.type == "cuda",
            )
        }
        if self.finetunes_encoder:
            trainable = [p for p in encoder.parameters() if p.requires_grad]  # frozen bottom layers excluded
            self.optimizers["encoder"] = make_optimizer(
                settings.optimizer, trainable, settings.lr_encoder, settings.warmup_steps, self.device
            )

    def _configure_encoder(self) -> None:
        """Applies the encoder settings: batch layout and token caps (from the memory budget, if set); for
        strategies that fine-tune it, the frozen bottom layers, whose outputs are cached once for every item (before
        the optimizer sees the parameters)."""
        self.encoder.attention = self.settings.attention
        self.encoder.batch_tokens = self.settings.encoder_batch_tokens
        freeze = self.settings.freeze_bottom_layers if self.finetunes_encoder else 0
        if freeze:
            self.encoder.freeze_bottom(freeze)
        self.memory_plan = self._memory_plan(cache_tokens=int(self.tokens.lengths.sum()) if freeze else 0)
        if freeze:
            self.encoder.cache_bottom(self.tokens, self.settings.encoder_batch_size)

    def _memory_plan(self, cache_tokens: int) -> MemoryPlan | None:
        """The encoder's token caps from settings.encoder_memory_gib (None, caps unchanged, when it is unset)."""
        budget = self.settings.encoder_memory_gib
        if budget is None or not self.uses_encoder:
            return None
        plan = plan_for_strategy(
            budget,
            self.encoder,
            self.tokens,
            self.device,
            self.head,
            tables=self.item_tables,
            regresses=self.bounded_backward,
            max_tokens=self.settings.encoder_batch_tokens,
            cache_tokens=cache_tokens,
            finetunes=self.finetunes_encoder,
            regression_graphs=self.bounded_backward and encoder_graphs_on(self.settings, self.device),
        )
        self.encoder.forward_tokens = plan.forward_tokens
        # A step whose graph the caps cannot bound keeps the fixed cap: smaller calls would only be slower.
        self.encoder.backward_tokens = plan.backward_tokens or self.settings.encoder_batch_tokens
        log.info("encoder memory plan", extra={"memory_plan": plan.as_dict()})
        if not self.bounded_backward and self.finetunes_encoder:
            log.warning(
                "encoder_memory_gib bounds only this strategy's inference encodes: its training step keeps the "
                "graph of all the step's items until the loss's backward",
                extra={"strategy": self.settings.label},
            )
        return plan

    # -- hooks for subclasses -------------------------------------------------------------------------
    def cf_parameters(self):
        return self.head.parameters()

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        """occurrences: [I] item indices -> [I, D] embeddings that the CF loss back-propagates into."""
        raise NotImplementedError

    def finish_step(self) -> None:
        """Called after loss.backward(): apply every update of this step."""
        self.finish_items()
        self._step("cf")

    def finish_items(self) -> None:
        """Every update of this step but the CF head's (which the static step applies inside its graph)."""

    # -- hooks of the static-shape CF step (trainer/graphed_step.py) -----------------------------------
    # Table strategies embed inside the graph (static_rows); encoder strategies run the encoder outside it and
    # take the gradient with respect to the embeddings back (static_rows returns None).
    wants_row_grads = True  # whether the step needs d(loss)/d(occurrence embeddings)

    def before_static_step(self, occurrences: torch.Tensor) -> None:
        """Eager work before the graph (occurrences: the padded batch's, on the device)."""

    def static_rows(self, occurrences: torch.Tensor) -> torch.Tensor | None:
        """Inside the graph: [I, D] embeddings of the padded occurrences, or None if they come from outside."""
        return None

    def static_row_grads(self, occurrences: torch.Tensor, grads: torch.Tensor) -> None:
        """Inside the graph, after backward: grads [I, D] of the loss with respect to each occurrence's row."""

    def after_step(self) -> None:
        """Eager work after the step's updates (multi-step GRAM: its regressions)."""

    def end_epoch(self) -> None:
        """Called after an epoch's last step, before its evaluation."""

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        """[N, D] embeddings for evaluation and export; rows for `items` are guaranteed current."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Strategy state beyond module weights and optimizers, for resumable checkpoints."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # -- shared helpers -------------------------------------------------------------------------------
    def _step(self, name: str, schedule: bool = True) -> None:
        optimizer, scheduler = self.optimizers[name]
        sum_gradients([p for group in optimizer.param_groups for p in group["params"]], self.world)
        optimizer.step()
        if schedule:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _inference_encode(self, items: torch.Tensor) -> torch.Tensor:
        """Deterministic (eval-mode) encoding, as serving will compute it."""
        was_training = self.encoder.training
        self.encoder.eval()
        batch = self.settings.encoder_batch_size
        show = self.settings.progress and (len(items) == self.num_items or len(items) > 8 * batch)  # whole tables
        out = self.encoder.encode(self.tokens, items, batch, progress=show)
        self.encoder.train(was_training)
        return out

    @torch.no_grad()
    def _check_encode(self, items: torch.Tensor) -> torch.Tensor:
        """Eval-mode encoding in float32: what a regression measures its passes with (no bf16 rounding noise)."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = self.encoder.encode(self.tokens, items, self.settings.encoder_batch_size, autocast=False)
        self.encoder.train(was_training)
        return out

    def _encoded_table(self, items: torch.Tensor) -> torch.Tensor:
        table = torch.zeros(self.num_items, self.encoder.dim, device=self.device)
        if len(items):
            table[items.to(self.device)] = self._inference_encode(items)
        return table


class EndToEnd(Strategy):
    """Fine-tunes the encoder through every interaction: one encoder pass per occurrence, dropout on."""

    finetunes_encoder = True
    encoder_train_mode = True
    item_tables = 1  # evaluation's table

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The step's encoder call as CUDA graphs (trainer/encoder_graphs.py): only when asked for (encoder_step
        # "graphed"; "auto" leaves it eager until a GPU measurement shows it pays, see the README). Not under a
        # memory budget: a graph holds its whole step's activations for the run, which the estimate does not bound.
        graphed = self.settings.encoder_step == "graphed" and self.memory_plan is None
        self.train_graphs = GraphedTrainEncode(self.encoder) if graphed else None

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self._train_encode(occurrences)

    def _train_encode(self, items: torch.Tensor) -> torch.Tensor:
        """[K, D] embeddings of `items` with autograd: replayed graphs where they apply, else the eager encode."""
        if self.train_graphs is not None and len(items) <= self.settings.encoder_batch_size:
            encoded = self.train_graphs.encode(self.tokens, items.cpu(), self.encoder.batch_tokens)
            if encoded is not None:
                return encoded
        return self.encoder.encode(self.tokens, items, self.settings.encoder_batch_size)

    def finish_items(self) -> None:
        self._step("encoder")

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        return self._encoded_table(items)


class GramSingleStep(EndToEnd):
    """GRAM-1S: encode each unique item once, keep its graph, and back-propagate dL/dh through it.

    h.backward(dL/dh) is the gradient of the pseudo-loss 0.5 * ||(h - dL/dh) - CE(c)||^2 at CE(c) = h, and by
    the chain rule it equals the E2E encoder gradient exactly. With dropout on (training mode, as in E2E) the one
    equivalence that does not hold is the masks: GRAM draws one dropout mask per unique item in the step, E2E one
    per occurrence. Without dropout the two are the same function (tested to 1e-9 in float64).
    """

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(occurrences, return_inverse=True)
        self._encoded = self._train_encode(unique)  # [U, D]
        self._leaf = self._encoded.detach().requires_grad_(True)
        return self._leaf[inverse.to(self.device)]  # gather: repeated items' gradients add up in _leaf.grad

    def finish_items(self) -> None:
        self._encoded.backward(gradient=self._leaf.grad)
        del self._encoded, self._leaf  # the step's graph and leaves go now
        super().finish_items()


class GramMultiStep(Strategy):
    """GRAM with an alternation period of N steps: CF trains against an item table, the encoder catches up.

    The table starts as one encoding of all items (`encoded` keeps each row's encoding, `table` the row CF
    training moved). Each step, the unique items' rows become leaf tensors; after backward the rows move by plain
    SGD: row -= table_lr * d(loss summed over the batch's users)/d(row) (the paper's Eq. 8 has table_lr = 1, too
    far for our heads: BENCHMARKS.md §1 has the measured step sizes behind the per-task defaults). Every N steps (and, for periods in epochs, at each epoch's end) the
    encoder regresses onto the rows touched since the last regression (trainer/regression.py) with its own
    optimizer (regress_lr, no warm-up), until the pseudo-loss 0.5 * sum ||row - CE(c)||^2 has fallen by
    regress_fit. The touched rows are then re-encoded; other rows re-encode lazily, the next time they are used,
    once the encoder has changed since they were encoded. Evaluation scores what export would: current
    encodings, never SGD-moved rows.

    Under torchrun every rank keeps the whole table: the rows any rank uses in a step are refreshed on all
    ranks, every rank applies every rank's row gradients (so rows shared by shards get the summed gradient),
    and each regression batch is split across ranks with the encoder gradients summed: the same updates as
    one process on the global batch.
    """

    finetunes_encoder = True
    item_tables = 2  # table, encoded
    bounded_backward = True

    def __init__(self, *args, initial_rows=None, **kwargs):  # initial_rows: see _starting_encoding
        super().__init__(*args, **kwargs)
        settings = self.settings
        self.period = settings.parsed_period
        self.period_steps = self.period.steps(self.steps_per_epoch)
        # The loss is the batch's mean; the table step is on the loss summed over the batch's users (Eq. 8). So it
        # already follows the linear rule: each user's gradient moves its rows by table_lr once an epoch at any CF
        # batch, and the regression sees targets as far away as at the tuned batch (cf_lr_scaling leaves it alone).
        self.table_lr = settings.table_lr * settings.batch_size
        trainable = [p for p in self.encoder.parameters() if p.requires_grad]
        self.optimizers["encoder"] = make_optimizer(  # regression steps are not E2E steps: no warm-up
            settings.optimizer, trainable, settings.regress_lr, 0, self.device
        )
        self.encoded = self._starting_encoding(initial_rows)  # [N, D] each row's encoding
        self.table = self.encoded.clone()  # [N, D] rows as CF training moved them
        self.row_version = torch.zeros(self.num_items, dtype=torch.long, device=self.device)
        self.touched = torch.zeros(self.num_items, dtype=torch.bool, device=self.device)
        self.encoder_version = 0
        self.steps_since_regression = 0
        self.regressions = 0
        self.regress_lr = float(settings.regress_lr or 0.0)  # quartered after a regression whose passes all failed
        self._generator = torch.Generator().manual_seed(settings.seed)
        graphed = encoder_graphs_on(settings, self.device)
        if self.memory_plan is not None and not self.memory_plan.regression_graphs:
            graphed = False  # the memory budget holds the eager regression only (the plan's notes say so)
        self.regress_graphs = GraphedPseudoLoss(self.encoder) if graphed else None  # kept: captures are reused

    def _starting_encoding(self, initial_rows: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Every item's encoding by the starting encoder. `initial_rows` = (item indices, rows) already encoded by
        that very encoder (a warm start's exported table, for items whose text is unchanged): those rows are taken
        as they are, so only the other items are encoded."""
        if initial_rows is None:
            return self._inference_encode(torch.arange(self.num_items))
        known, rows = initial_rows
        encoded = torch.empty(self.num_items, self.encoder.dim, device=self.device)
        missing = torch.ones(self.num_items, dtype=torch.bool)
        missing[known] = False
        encoded[known.to(self.device)] = rows.to(self.device, torch.float32)
        if bool(missing.any()):
            fresh = missing.nonzero().squeeze(1)
            encoded[fresh.to(self.device)] = self._inference_encode(fresh)
        return encoded

    def _refresh(self, items: torch.Tensor) -> None:
        items = items.to(self.device)
        stale = items[self.row_version[items] < self.encoder_version]
        if len(stale):
            self._set_encoding(stale, self._inference_encode(stale))

    def _reencode(self, items: torch.Tensor) -> None:
        """New encodings of `items` ([K] on the device) into both tables, REENCODE_CHUNK items at a time: no [K, D]
        output alive at once (on titles, with the regression's targets, GRAM-1E's peak: trainer/memory_budget.py)."""
        for chunk in items.split(REENCODE_CHUNK):
            self._set_encoding(chunk, self._inference_encode(chunk))

    def _set_encoding(self, items: torch.Tensor, encoding: torch.Tensor) -> None:
        self.encoded[items] = encoding
        self.table[items] = encoding
        self.row_version[items] = self.encoder_version

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(occurrences.to(self.device), return_inverse=True)
        self._refresh(torch.unique(all_gather_rows(unique, self.world)))  # every rank's copy stays identical
        self._unique = unique
        self._leaf = self.table[unique].clone().requires_grad_(True)  # [U, D]
        return self._leaf[inverse]

    @torch.no_grad()
    def _sgd_update_table(self) -> None:
        items = all_gather_rows(self._unique, self.world)  # [U_all]; an item may come from several ranks
        grads = all_gather_rows(self._leaf.grad, self.world)  # [U_all, D]
        self.table.index_add_(0, items, grads, alpha=-self.table_lr)  # shared rows get the summed gradient
        self.touched[items] = True
        del self._unique, self._leaf

    def finish_items(self) -> None:
        self._sgd_update_table()

    def finish_step(self) -> None:
        super().finish_step()
        self.after_step()

    def before_static_step(self, occurrences: torch.Tensor) -> None:
        """Rows are only stale once a regression moved the encoder: before that, no check (and no sync)."""
        if self.encoder_version > 0:
            self._refresh(torch.unique(occurrences))

    def static_rows(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.table[occurrences]

    def static_row_grads(self, occurrences: torch.Tensor, grads: torch.Tensor) -> None:
        """The table step of _sgd_update_table, per occurrence: repeated items' gradients add up in index_add_
        as they do in the unique rows' leaf (the padded occurrences' gradients are exactly zero)."""
        self.table.index_add_(0, occurrences, grads, alpha=-self.table_lr)
        self.touched.index_fill_(0, occurrences, True)  # a Python scalar: no host tensor in the graph

    def after_step(self) -> None:
        """Counts the step; regresses at the end of a period."""
        self.steps_since_regression += 1
        if self.steps_since_regression >= self.period_steps:
            self.regress()

    def end_epoch(self) -> None:
        """A period in epochs ends with the epoch: its last regression comes before the epoch's evaluation."""
        if self.period.unit == "e" and bool(self.touched.any()):
            self.regress()

    def regress(self) -> RegressionReport | None:
        """Fits the encoder to the rows touched since the last regression, then re-encodes those rows.

        The rows were encoded in eval mode, so the regression runs in eval mode too: the residual is then exactly
        the accumulated CF move of each row, not swamped by dropout noise.
        """
        was_training = self.encoder.training
        self.encoder.eval()
        touched = self.touched.nonzero().squeeze(1)
        report = None
        if len(touched):
            kept, report = regress(
                self.encoder,
                self.tokens,
                touched.cpu(),
                TableRows(self.table, touched),
                self._untouched_sample(),
                self._plan(),
                self.optimizers["encoder"][0],
                lambda: self._step("encoder", schedule=False),  # the regression sets its own learning rate
                self._check_encode,
                self._generator,
                self.world,
                progress=self.settings.progress and self.world.is_main,
                graphs=self.regress_graphs,
            )
            self.reports.append(report)
            log.info("regression", extra={"regression": self.regressions, **report.as_dict()})
            self.regress_lr = report.lr_next
            if kept:  # else the encoder, and so every encoding, is as it was
                self.encoder_version += 1
                self._reencode(touched)
        self.encoder.train(was_training)
        self.regressions += 1
        self.touched.zero_()
        self.steps_since_regression = 0
        return report

    def _plan(self) -> RegressionPlan:
        s = self.settings
        return RegressionPlan(
            lr=self.regress_lr,
            batch_items=s.regress_batch_size,
            micro_items=s.encoder_batch_size,
            fit=s.regress_fit,
            max_passes=s.regress_max_passes,
            max_seconds=s.regress_max_s,
            backtrack=s.regress_backtrack,
            line_search=s.regress_line_search,
            check_items=s.regress_check_items,
            deadline=self.deadline,
        )

    def _untouched_sample(self) -> torch.Tensor:
        untouched = (~self.touched).nonzero().squeeze(1).cpu()
        pick = torch.randperm(len(untouched), generator=self._generator)[:UNTOUCHED_SAMPLE]
        return untouched[pick]

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        """Current encodings of `items` (rows CF moved since the last regression are scored as export will
        encode them, not as moved)."""
        self._refresh(items)
        return self.encoded

    def state_tensors(self) -> dict[str, torch.Tensor]:
        counters = [self.encoder_version, self.steps_since_regression, self.regressions]
        return {
            "table": self.table,
            "encoded": self.encoded,
            "row_version": self.row_version,
            "touched": self.touched,
            "counters": torch.tensor(counters, dtype=torch.long),
            "regress_lr": torch.tensor([self.regress_lr], dtype=torch.float64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.table.copy_(tensors["table"])
        self.row_version.copy_(tensors["row_version"])
        self.touched.copy_(tensors["touched"])
        self.encoder_version, self.steps_since_regression, self.regressions = tensors["counters"].tolist()
        if "regress_lr" in tensors:  # checkpoints from before the adaptive rate start at the configured one
            self.regress_lr = float(tensors["regress_lr"][0])
        if "encoded" in tensors:
            self.encoded.copy_(tensors["encoded"])
        else:  # a checkpoint from before `encoded` existed: its rows' encodings are unknown, so re-encode them
            self.encoded.copy_(self.table)
            self.row_version.fill_(-1)
            self.touched.zero_()


class NoFinetune(Strategy):
    """Frozen pre-trained encoder: items are encoded once and only the CF head learns."""

    item_tables = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = self._inference_encode(torch.arange(self.num_items))  # [N, D]

    wants_row_grads = False

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.table[occurrences.to(self.device)]

    def static_rows(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.table[occurrences]

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        return self.table

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The table, when it was encoded in full float32 precision (CPU, no autocast): the export then reuses it
        instead of encoding every item a second time (the frozen encoder would give the same rows)."""
        return {"table": self.table} if self.device.type == "cpu" else {}


class NoContent(Strategy):
    """No text at all: a learned embedding per item id (cold-start items keep their random init)."""

    uses_encoder = False

    def __init__(self, encoder, tokens, head, settings, steps_per_epoch, world: World = SINGLE):
        self.id_embedding = nn.Embedding(len(tokens), encoder.dim).to(next(head.parameters()).device)
        nn.init.normal_(self.id_embedding.weight, std=0.1)
        super().__init__(encoder, tokens, head, settings, steps_per_epoch, world)

    def cf_parameters(self):
        return [*self.head.parameters(), *self.id_embedding.parameters()]

    wants_row_grads = False  # the embedding is a CF parameter: its gradient reaches the CF optimizer directly

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.id_embedding(occurrences.to(self.device))

    def static_rows(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.id_embedding(occurrences)

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        return self.id_embedding.weight.detach()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"id_embedding": self.id_embedding.weight.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.id_embedding.weight.copy_(tensors["id_embedding"])


def make_strategy(
    encoder: ContentEncoder,
    tokens: ItemTokens,
    head: nn.Module,
    settings: TrainSettings,
    steps_per_epoch: int,
    world: World = SINGLE,
    initial_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Strategy:
    """`initial_rows`: GRAM's starting table for the items it covers (see GramMultiStep._starting_encoding)."""
    args = (encoder, tokens, head, settings, steps_per_epoch, world)
    if settings.strategy == "e2e":
        return EndToEnd(*args)
    if settings.strategy == "gram":
        if settings.parsed_period.is_single_step:
            return GramSingleStep(*args)
        return GramMultiStep(*args, initial_rows=initial_rows)
    if settings.strategy == "nofinetune":
        return NoFinetune(*args)
    return NoContent(*args)
