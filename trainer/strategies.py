"""How item embeddings are produced during training and how the content encoder learns from the CF loss.

Every strategy follows the same step, driven by the training loop:

    occurrence_embeddings = strategy.embed(batch.occurrences)   # [I, D], one row per interaction
    total, count = task.loss_terms(head, occurrence_embeddings (+ a zero padding row), batch)
    (total / global count of targets).backward()
    strategy.finish_step()                                        # optimizer steps, GRAM bookkeeping

E2E runs the encoder once per interaction. GRAM runs it once per unique item: the unique items' embeddings
become leaf tensors, so autograd sums the gradients of repeated items into one row per item (dL/dh).
"""

from __future__ import annotations

import torch
from torch import nn

from gramrec.models.content_encoder import ContentEncoder, ItemTokens, batch_bounds
from gramrec.trainer.distributed import SINGLE, World, all_gather_rows, sum_gradients
from gramrec.trainer.settings import TrainSettings


def make_optimizer(kind: str, params, lr: float, warmup_steps: int, device: torch.device):
    """Adam (or plain SGD) with linear warm-up to a constant learning rate; fused Adam kernels on CUDA."""
    params = list(params)
    if kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")
    # Linear warm-up from lr/(warmup+1) (not from 0, which would waste the first step) to a constant lr.
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    return optimizer, warmup


class Strategy:
    """Base class: the CF head always trains with Adam; subclasses decide how items are embedded."""

    finetunes_encoder = False

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
        self._configure_encoder()
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, object]] = {
            "cf": make_optimizer(settings.optimizer, self.cf_parameters(), settings.lr_cf, settings.warmup_steps, self.device)
        }
        if self.finetunes_encoder:
            trainable = [p for p in encoder.parameters() if p.requires_grad]  # frozen bottom layers excluded
            self.optimizers["encoder"] = make_optimizer(
                settings.optimizer, trainable, settings.lr_encoder, settings.warmup_steps, self.device
            )

    def _configure_encoder(self) -> None:
        """Applies the encoder settings: batch layout and token cap; for strategies that fine-tune it, the frozen
        bottom layers, whose outputs are cached once for every item (before the optimizer sees the parameters)."""
        self.encoder.attention = self.settings.attention
        self.encoder.batch_tokens = self.settings.encoder_batch_tokens
        if self.finetunes_encoder and self.settings.freeze_bottom_layers:
            self.encoder.freeze_bottom(self.settings.freeze_bottom_layers)
            self.encoder.cache_bottom(self.tokens, self.settings.encoder_batch_size)

    # -- hooks for subclasses -------------------------------------------------------------------------
    def cf_parameters(self):
        return self.head.parameters()

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        """occurrences: [I] item indices -> [I, D] embeddings that the CF loss back-propagates into."""
        raise NotImplementedError

    def finish_step(self) -> None:
        """Called after loss.backward(): apply every update of this step."""
        self._step("cf")

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        """[N, D] embeddings for evaluation and export; rows for `items` are guaranteed current."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Strategy state beyond module weights and optimizers, for resumable checkpoints."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # -- shared helpers -------------------------------------------------------------------------------
    def _step(self, name: str) -> None:
        optimizer, scheduler = self.optimizers[name]
        sum_gradients([p for group in optimizer.param_groups for p in group["params"]], self.world)
        optimizer.step()
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

    def _encoded_table(self, items: torch.Tensor) -> torch.Tensor:
        table = torch.zeros(self.num_items, self.encoder.dim, device=self.device)
        if len(items):
            table[items.to(self.device)] = self._inference_encode(items)
        return table


class EndToEnd(Strategy):
    """Fine-tunes the encoder through every interaction: one encoder pass per occurrence."""

    finetunes_encoder = True

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(self.tokens, occurrences, self.settings.encoder_batch_size)

    def finish_step(self) -> None:
        self._step("encoder")
        self._step("cf")

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        return self._encoded_table(items)


class GramSingleStep(EndToEnd):
    """GRAM-1S: encode each unique item once, keep its graph, and back-propagate dL/dh through it.

    h.backward(dL/dh) is the gradient of the pseudo-loss 0.5 * ||(h - dL/dh) - CE(c)||^2 at CE(c) = h, and by
    the chain rule it equals the E2E encoder gradient exactly.
    """

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(occurrences, return_inverse=True)
        self._encoded = self.encoder.encode(self.tokens, unique, self.settings.encoder_batch_size)  # [U, D]
        self._leaf = self._encoded.detach().requires_grad_(True)
        return self._leaf[inverse.to(self.device)]  # gather: repeated items' gradients add up in _leaf.grad

    def finish_step(self) -> None:
        self._encoded.backward(gradient=self._leaf.grad)
        self._encoded = self._leaf = None
        super().finish_step()


class GramMultiStep(Strategy):
    """GRAM with an alternation period of N steps: CF trains against an item table, the encoder catches up.

    The table starts as one encoding of all items. Each step, the unique items' rows become leaf tensors;
    after backward the rows move by plain SGD with lr = 1 (row -= dL/drow; the leaf is new every step, so
    its gradient starts at zero). Every N steps the encoder regresses onto the rows touched since the last
    regression (pseudo-loss 0.5 * sum ||row - CE(c)||^2, one encoder Adam step per `regress_batch_size`
    items). A row is re-encoded lazily, the next time it is used, once the encoder has changed since it was
    encoded; before evaluation every stale row that evaluation needs (untouched and cold-start items) is.

    Under torchrun every rank keeps the whole table: the rows any rank uses in a step are refreshed on all
    ranks, every rank applies every rank's row gradients (so rows shared by shards get the summed gradient),
    and each regression chunk is split across ranks with the encoder gradients summed: the same updates as
    one process on the global batch.
    """

    finetunes_encoder = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.period_steps = self.settings.parsed_period.steps(self.steps_per_epoch)
        self.table = self._inference_encode(torch.arange(self.num_items))  # [N, D]
        self.row_version = torch.zeros(self.num_items, dtype=torch.long, device=self.device)
        self.touched = torch.zeros(self.num_items, dtype=torch.bool, device=self.device)
        self.encoder_version = 0
        self.steps_since_regression = 0
        self.regressions = 0
        self._generator = torch.Generator().manual_seed(self.settings.seed)

    def _refresh(self, items: torch.Tensor) -> None:
        items = items.to(self.device)
        stale = items[self.row_version[items] < self.encoder_version]
        if len(stale):
            self.table[stale] = self._inference_encode(stale)
            self.row_version[stale] = self.encoder_version

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
        self.table.index_add_(0, items, grads, alpha=-1.0)  # lr = 1; shared rows get the summed gradient
        self.touched[items] = True
        self._unique = self._leaf = None

    def finish_step(self) -> None:
        self._sgd_update_table()
        super().finish_step()
        self.steps_since_regression += 1
        if self.steps_since_regression >= self.period_steps:
            self.regress()

    def regress(self) -> None:
        """Moves the encoder towards the table rows touched since the last regression.

        The rows were encoded in eval mode, so the regression runs in eval mode too: the residual is then
        exactly the accumulated -dL/dh (plus encoder drift), not swamped by dropout noise, which under Adam's
        normalisation would otherwise dominate every regression step.
        """
        was_training = self.encoder.training
        self.encoder.eval()
        touched = self.touched.nonzero().squeeze(1).cpu()
        touched = touched[torch.randperm(len(touched), generator=self._generator)]
        step_items, micro = self.settings.regress_batch_size, self.settings.encoder_batch_size
        packed = self.encoder.uses_packed(self.device, autocast=True)
        for start in range(0, len(touched), step_items):
            chunk = touched[start : start + step_items]
            chunk = chunk[torch.argsort(self.tokens.lengths[chunk], stable=True)]  # micro-batches of like lengths
            chunk = chunk[self.world.rank :: self.world.size]  # this rank's share; _step sums the gradients
            # Micro-batches within the encoder's item and token caps, each back-propagated before the next, so
            # only one micro-batch's graph is alive: peak memory follows encoder_batch_tokens, not the chunk.
            for lo, hi in batch_bounds(self.tokens.lengths[chunk], micro, self.encoder.batch_tokens, packed):
                items = chunk[lo:hi]
                predicted = self.encoder.encode(self.tokens, items, micro)  # [b, D]
                target = self.table[items.to(self.device)]
                (0.5 * (predicted - target).pow(2).sum()).backward()
            self._step("encoder")
        self.encoder.train(was_training)
        self.encoder_version += 1
        self.regressions += 1
        self.touched.zero_()
        self.steps_since_regression = 0

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        self._refresh(items)
        return self.table

    def state_tensors(self) -> dict[str, torch.Tensor]:
        counters = [self.encoder_version, self.steps_since_regression, self.regressions]
        return {
            "table": self.table,
            "row_version": self.row_version,
            "touched": self.touched,
            "counters": torch.tensor(counters, dtype=torch.long),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.table.copy_(tensors["table"])
        self.row_version.copy_(tensors["row_version"])
        self.touched.copy_(tensors["touched"])
        self.encoder_version, self.steps_since_regression, self.regressions = tensors["counters"].tolist()


class NoFinetune(Strategy):
    """Frozen pre-trained encoder: items are encoded once and only the CF head learns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = self._inference_encode(torch.arange(self.num_items))  # [N, D]

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.table[occurrences.to(self.device)]

    def item_table(self, items: torch.Tensor) -> torch.Tensor:
        return self.table

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The table, when it was encoded in full float32 precision (CPU, no autocast): the export then reuses it
        instead of encoding every item a second time (the frozen encoder would give the same rows)."""
        return {"table": self.table} if self.device.type == "cpu" else {}


class NoContent(Strategy):
    """No text at all: a learned embedding per item id (cold-start items keep their random init)."""

    def __init__(self, encoder, tokens, head, settings, steps_per_epoch, world: World = SINGLE):
        self.id_embedding = nn.Embedding(len(tokens), encoder.dim).to(next(head.parameters()).device)
        nn.init.normal_(self.id_embedding.weight, std=0.1)
        super().__init__(encoder, tokens, head, settings, steps_per_epoch, world)

    def cf_parameters(self):
        return [*self.head.parameters(), *self.id_embedding.parameters()]

    def embed(self, occurrences: torch.Tensor) -> torch.Tensor:
        return self.id_embedding(occurrences.to(self.device))

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
) -> Strategy:
    args = (encoder, tokens, head, settings, steps_per_epoch, world)
    if settings.strategy == "e2e":
        return EndToEnd(*args)
    if settings.strategy == "gram":
        return GramSingleStep(*args) if settings.parsed_period.is_single_step else GramMultiStep(*args)
    if settings.strategy == "nofinetune":
        return NoFinetune(*args)
    return NoContent(*args)
