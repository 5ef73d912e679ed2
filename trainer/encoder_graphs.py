"""The encoder's training calls without per-call host overhead: CUDA graphs per padded batch shape.

An encoder call on up to a few thousand short texts is host-bound: on an H200 (BENCHMARKS.md §3) 256 titles cost
~13 ms of which the GPU was busy 4.7 ms (490 kernel launches, ~210 autocast weight casts, the autograd engine's
Python), 1,024 titles ~20 ms. Training makes such calls over and over on a few shapes:

  * multi-step GRAM's regression (`GraphedPseudoLoss`): hundreds of eval-mode forward+backward calls a pass; one
    graph per shape holds the forward, the pseudo-loss 0.5 * sum ||CE(c) - target||^2 and its backward;
  * E2E's and GRAM-1S's step (`GraphedTrainEncode`): one train-mode call a step whose backward comes later, through
    the CF loss; two graphs per shape, the forward and the backward, joined by an autograd function.

Each call is padded to a row bucket and to its width (its longest text rounded up to 8, as `ItemTokens.batch` lays
it out). Padding changes nothing: rows of a padded batch never interact, padded rows get one unmasked token (so
attention never sees an empty row) and add nothing to any gradient (weight 0, or a zero output gradient). Gradients
are summed into buffers that the parameters' `.grad` point at, so optimizers see them as usual. Long texts (the
packed layout, `ContentEncoder.uses_packed`) and the frozen-bottom cache stay eager. On a CPU the same padded calls
run eagerly: what the tests compare with the reference calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.trainer.cuda_graphs import WARMUP_CALLS, CapturedGraphs, on_side_stream

MIN_ROWS = 8  # smallest row bucket
ROW_STEP = 128  # above 256 rows, buckets grow by this many rows (a step's item count varies by a few percent)


def row_bucket(rows: int) -> int:
    """Rows of the graph a batch of `rows` texts runs in: the next power of two up to 256, then the next multiple
    of ROW_STEP (at most ~12% padding where a power of two could waste half)."""
    if rows <= 256:
        return max(MIN_ROWS, 1 << (rows - 1).bit_length())
    return -(-rows // ROW_STEP) * ROW_STEP


def row_buckets(rows: torch.Tensor) -> torch.Tensor:
    """row_bucket of each count in `rows` (a micro-batch's candidate sizes, at most a few hundred)."""
    return torch.tensor([row_bucket(n) for n in rows.tolist()], dtype=torch.long)


def padded_inputs(tokens: ItemTokens, items: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of `items` ([b], sorted by length) padded to `rows` rows: [rows, W] each (CPU)."""
    input_ids, attention_mask = tokens.batch(items)
    b, width = input_ids.shape
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    ids[:b], mask[:b] = input_ids, attention_mask
    mask[b:, 0] = 1
    return ids, mask


def copy_in(static: torch.Tensor, value: torch.Tensor) -> None:
    """A host tensor into a graph's static input: pinned and asynchronous on CUDA, so staging never waits."""
    cuda = static.device.type == "cuda"
    static.copy_(value.pin_memory() if cuda else value, non_blocking=cuda)


class _EncoderGraphs(CapturedGraphs):
    """What both kinds of graphed call share: the trained parameters' gradient buffers, one private memory pool
    (a shape's graphs run to completion before another shape's start, so shapes can share it), capture with an
    eager fallback, and the counters the benchmarks report."""

    graphs_name = "encoder graphs"

    def __init__(self, encoder: ContentEncoder):
        self.encoder = encoder
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        super().__init__(self.params[0].device)
        self.grads = [torch.zeros_like(p) for p in self.params]  # what .grad points at between optimizer steps
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def accepts(self, tokens: ItemTokens, items: torch.Tensor, token_cap: int | None) -> bool:
        """Whether items ([b], sorted by length) can run as one padded call within the token cap."""
        longest = int(tokens.lengths[items[-1]])
        encoder = self.encoder
        if encoder.bottom_cache is not None or encoder.uses_packed(self.device, autocast=True, max_length=longest):
            return False
        return token_cap is None or row_bucket(len(items)) * tokens.padded_width(longest) <= token_cap

    def point_grads(self) -> None:
        """Makes each .grad our buffer. After an optimizer step's zero_grad(set_to_none) the buffers start from
        zero; gradients an eager call left elsewhere are carried into them."""
        cleared = []
        for param, buffer in zip(self.params, self.grads):
            if param.grad is buffer:
                continue
            if param.grad is None:
                cleared.append(buffer)
            else:
                buffer.copy_(param.grad)
            param.grad = buffer
        if cleared:
            torch._foreach_zero_(cleared)  # one launch, not one per parameter

    def add_grads(self, grads: Sequence[torch.Tensor | None]) -> None:
        pairs = [(buffer, grad) for buffer, grad in zip(self.grads, grads) if grad is not None]
        torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])

    def autocast(self):
        """bf16 autocast on CUDA, without the cast cache (a graph must recast the weights each replay)."""
        on = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on, cache_enabled=False)


# -- multi-step GRAM's regression ---------------------------------------------------------------------------------
@dataclass
class _LossShape:
    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    targets: torch.Tensor  # [B, D]
    weights: torch.Tensor  # [B] 1 for real rows, 0 for padding
    eager_calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None


class GraphedPseudoLoss(_EncoderGraphs):
    """Accumulates d(0.5 * sum ||CE(c) - target||^2)/d(theta) into the trainable parameters' .grad, by replaying a
    captured graph per padded shape (CUDA) or running the same padded call eagerly (CPU)."""

    def __init__(self, encoder: ContentEncoder):
        super().__init__(encoder)
        self.shapes: dict[tuple[int, int, bool, torch.dtype], _LossShape] = {}

    def accumulate(self, tokens: ItemTokens, items: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds the pseudo-loss gradient of `items` ([b], CPU, sorted by length) against targets [b, D]."""
        b = len(items)
        ids, mask = padded_inputs(tokens, items, row_bucket(b))
        shape = self._shape(ids.shape[0], ids.shape[1], self.encoder.training, targets.dtype)
        weights = torch.zeros(len(ids), dtype=targets.dtype)
        weights[:b] = 1.0
        for static, value in ((shape.input_ids, ids), (shape.attention_mask, mask), (shape.weights, weights)):
            copy_in(static, value)
        shape.targets[:b].copy_(targets)
        shape.targets[b:].zero_()
        self.point_grads()
        self._run(shape)
        self.encoder.items_forward += b
        self.encoder.items_backward += b

    def _shape(self, rows: int, width: int, training: bool, dtype: torch.dtype) -> _LossShape:
        key = (rows, width, training, dtype)  # a graph holds the dropout mode it was captured in
        if key not in self.shapes:
            device, dim = self.device, self.encoder.dim
            self.shapes[key] = _LossShape(
                input_ids=torch.zeros(rows, width, dtype=torch.long, device=device),
                attention_mask=torch.zeros(rows, width, dtype=torch.long, device=device),
                targets=torch.zeros(rows, dim, dtype=dtype, device=device),
                weights=torch.zeros(rows, dtype=dtype, device=device),
            )
        return self.shapes[key]

    def _body(self, shape: _LossShape) -> None:
        """The call as captured: padded forward, weighted pseudo-loss, backward, gradients summed into the buffers."""
        with self.autocast():
            predicted = self.encoder(shape.input_ids, shape.attention_mask)  # [B, D]
        residual = (predicted.to(shape.targets.dtype) - shape.targets) * shape.weights[:, None]  # bf16 -> float32
        loss = 0.5 * residual.pow(2).sum()
        self.add_grads(torch.autograd.grad(loss, self.params, allow_unused=True))

    def _run(self, shape: _LossShape) -> None:
        if not self.capture:
            self._body(shape)
            return
        if shape.graph is None and shape.eager_calls < WARMUP_CALLS:  # a real call
            on_side_stream(self.device, lambda: self._body(shape))
            shape.eager_calls += 1
            return
        if shape.graph is None:
            graphs = self.captured(lambda: self._body(shape))
            if graphs is None:
                self._body(shape)
                return
            shape.graph = graphs[0]
        shape.graph.replay()
        self.replays += 1


# -- E2E's and GRAM-1S's step -------------------------------------------------------------------------------------
@dataclass
class _EncodeShape:
    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    grad_output: torch.Tensor  # [B, D] d(loss)/d(output), zero on padded rows
    output: torch.Tensor | None = None  # [B, D] float32, written by the forward graph
    forward: torch.cuda.CUDAGraph | None = None
    backward: torch.cuda.CUDAGraph | None = None
    eager_calls: int = 0
    pending: bool = False  # forward replayed, backward not yet: the shape's activations are taken


class _Replayed(torch.autograd.Function):
    """The forward graph's output as an autograd node whose backward replays the backward graph."""

    @staticmethod
    def forward(ctx, anchor, graphs, shape, rows):
        ctx.graphs, ctx.shape, ctx.rows = graphs, shape, rows
        shape.forward.replay()
        return shape.output[:rows].clone()

    @staticmethod
    def backward(ctx, grad):
        shape, rows = ctx.shape, ctx.rows
        shape.grad_output[:rows].copy_(grad)
        shape.grad_output[rows:].zero_()
        ctx.graphs.point_grads()
        shape.backward.replay()
        shape.pending = False
        return None, None, None, None


class GraphedTrainEncode(_EncoderGraphs):
    """encode(items) -> [K, D] with autograd, for a step whose loss back-propagates into the encoder later: the
    forward replays one graph, the backward (when the CF loss's backward reaches it) another. One call per step;
    a second call of a shape whose backward is still due, and anything `accepts` refuses, runs eagerly (None)."""

    def __init__(self, encoder: ContentEncoder):
        super().__init__(encoder)
        self.shapes: dict[tuple[int, int, bool], _EncodeShape] = {}
        self.anchor = torch.zeros(1, device=self.device, requires_grad=True)  # puts _Replayed on the tape

    def encode(self, tokens: ItemTokens, items: torch.Tensor, token_cap: int | None) -> torch.Tensor | None:
        """Embeddings of `items` ([K] CPU, repeats allowed) in their order, or None: run them eagerly instead."""
        order = torch.argsort(tokens.lengths[items], stable=True)
        ordered = items[order]
        if not torch.is_grad_enabled() or not self.accepts(tokens, ordered, token_cap):
            return None
        b = len(ordered)
        ids, mask = padded_inputs(tokens, ordered, row_bucket(b))
        shape = self._shape(ids.shape[0], ids.shape[1], self.encoder.training)
        if shape.pending:
            return None
        if not self.capture or (shape.forward is None and shape.eager_calls < WARMUP_CALLS):
            out = self._eager(ids, mask)[:b]
            shape.eager_calls += 1
        else:
            copy_in(shape.input_ids, ids)
            copy_in(shape.attention_mask, mask)
            if shape.forward is None and not self._capture(shape):
                return None
            out = _Replayed.apply(self.anchor, self, shape, b)
            shape.pending = True
            self.replays += 1
        self.encoder.items_forward += len(items)
        self.encoder.items_backward += len(items)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return out[inverse.to(self.device)]

    def _eager(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The padded call run eagerly (CPU, warm-up): fresh inputs, so a later stage cannot overwrite them."""
        with self.autocast():
            pooled = self.encoder(ids.to(self.device), mask.to(self.device))
        return pooled.float() if pooled.dtype == torch.bfloat16 else pooled

    def _shape(self, rows: int, width: int, training: bool) -> _EncodeShape:
        key = (rows, width, training)
        if key not in self.shapes:
            device = self.device
            self.shapes[key] = _EncodeShape(
                input_ids=torch.zeros(rows, width, dtype=torch.long, device=device),
                attention_mask=torch.zeros(rows, width, dtype=torch.long, device=device),
                grad_output=torch.zeros(rows, self.encoder.dim, device=device),
            )
        return self.shapes[key]

    def _capture(self, shape: _EncodeShape) -> bool:
        def forward() -> None:
            with self.autocast():
                pooled = self.encoder(shape.input_ids, shape.attention_mask)
            shape.output = pooled.float()

        def backward() -> None:
            assert shape.output is not None
            grads = torch.autograd.grad(shape.output, self.params, shape.grad_output, allow_unused=True)
            self.add_grads(grads)

        graphs = self.captured(forward, backward)
        if graphs is None:
            return False
        shape.forward, shape.backward = graphs
        assert shape.output is not None
        shape.output = shape.output.detach()  # the static output; its tape was used up by the backward's capture
        return True
