"""The regression's encoder calls without per-call host overhead: one CUDA graph per padded batch shape.

Multi-step GRAM's regression makes hundreds of encoder forward+backward calls a pass, each on a few hundred short
texts, in eval mode. Such a call is host-bound: on an H200 (BENCHMARKS.md §3) 256 titles cost ~13 ms of which the
GPU was busy 4.7 ms (490 kernel launches, ~210 autocast weight casts, the autograd engine's Python), and a pass ran
at 12,200 rows/s against the encoder's 71,000+ rows/s floor. Here each (rows, width) shape is captured once: the
padded forward, the pseudo-loss 0.5 * sum ||CE(c) - target||^2, its backward and the sum of its gradients into one
set of gradient buffers that the parameters' `.grad` then points at; a replay is one launch.

Padding adds exactly nothing: padded rows have weight 0 (and one unmasked token, so attention never sees an empty
row), and rows of a padded batch never interact. Long texts (the packed layout, `ContentEncoder.uses_packed`) stay
eager: there the GPU, not the host, is the cost. On a CPU the same padded call runs eagerly (what the tests check).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gramrec.models.content_encoder import PAD_MULTIPLE, ContentEncoder, ItemTokens

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # real (eager) calls per shape before its capture: allocator, cuBLAS workspaces, attention plans
MIN_ROWS = 8  # smallest row bucket


def row_bucket(rows: int) -> int:
    """Rows of the graph a batch of `rows` texts runs in: the next power of two (at least MIN_ROWS)."""
    return max(MIN_ROWS, 1 << (rows - 1).bit_length())


@dataclass
class _Shape:
    """One (rows, width) shape: static inputs, and its graph once captured."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    targets: torch.Tensor  # [B, D] float32
    weights: torch.Tensor  # [B] 1 for real rows, 0 for padding
    eager_calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None


class GraphedPseudoLoss:
    """Accumulates d(0.5 * sum ||CE(c) - target||^2)/d(theta) into the trainable parameters' .grad, by replaying a
    captured graph per padded shape (CUDA) or running the same padded call eagerly (CPU)."""

    def __init__(self, encoder: ContentEncoder):
        self.encoder = encoder
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.capture = self.device.type == "cuda"
        self.grads = [torch.zeros_like(p) for p in self.params]  # what .grad points at between optimizer steps
        self.shapes: dict[tuple[int, int, bool, torch.dtype], _Shape] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # one pool: shapes never overlap
        self.captures = 0
        self.replays = 0
        self.capture_s = 0.0
        self.capture_error: str | None = None

    def accepts(self, tokens: ItemTokens, rows: torch.Tensor, token_cap: int | None) -> bool:
        """Whether the batch of items `rows` (sorted by length) can run here: the padded layout, no bottom cache,
        and its padded shape within the encoder's token cap."""
        encoder = self.encoder
        longest = int(tokens.lengths[rows[-1]])
        if encoder.bottom_cache is not None or encoder.uses_packed(self.device, autocast=True, max_length=longest):
            return False
        width = self._width(tokens, longest)
        return token_cap is None or row_bucket(len(rows)) * width <= token_cap

    def accumulate(self, tokens: ItemTokens, rows: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds the pseudo-loss gradient of items `rows` ([b], CPU, sorted by length) against targets [b, D]."""
        input_ids, attention_mask = tokens.batch(rows)  # [b, W] (W: the longest rounded up, as encode pads)
        b, width = input_ids.shape
        shape = self._shape(row_bucket(b), width, self.encoder.training, targets.dtype)
        self._stage(shape, input_ids, attention_mask, targets)
        self._point_grads()
        self._run(shape)
        self.encoder.items_forward += b
        self.encoder.items_backward += b

    # -- internals ---------------------------------------------------------------------------------------
    @staticmethod
    def _width(tokens: ItemTokens, longest: int) -> int:
        return min(tokens.input_ids.shape[1], -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)

    def _shape(self, rows: int, width: int, training: bool, dtype: torch.dtype) -> _Shape:
        key = (rows, width, training, dtype)  # a graph holds the dropout mode it was captured in
        if key not in self.shapes:
            device, dim = self.device, self.encoder.dim
            self.shapes[key] = _Shape(
                input_ids=torch.zeros(rows, width, dtype=torch.long, device=device),
                attention_mask=torch.zeros(rows, width, dtype=torch.long, device=device),
                targets=torch.zeros(rows, dim, dtype=dtype, device=device),
                weights=torch.zeros(rows, dtype=dtype, device=device),
            )
        return self.shapes[key]

    @staticmethod
    def _stage(shape: _Shape, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> None:
        """Copies a batch into the shape's static inputs; padded rows get one unmasked token and weight 0."""
        b, rows = len(input_ids), len(shape.weights)
        ids = torch.zeros(shape.input_ids.shape, dtype=torch.long)
        mask = torch.zeros(shape.attention_mask.shape, dtype=torch.long)
        ids[:b] = input_ids
        mask[:b] = attention_mask
        mask[b:, 0] = 1
        weights = torch.zeros(rows, dtype=shape.weights.dtype)
        weights[:b] = 1.0
        non_blocking = shape.input_ids.device.type == "cuda"
        for static, value in ((shape.input_ids, ids), (shape.attention_mask, mask), (shape.weights, weights)):
            static.copy_(value.pin_memory() if non_blocking else value, non_blocking=non_blocking)
        shape.targets[:b].copy_(targets)
        shape.targets[b:].zero_()

    def _point_grads(self) -> None:
        """Makes each .grad our buffer. After an optimizer step's zero_grad(set_to_none) the buffers start from
        zero; gradients an eager call left elsewhere (a packed micro-batch) are carried into them."""
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

    def _body(self, shape: _Shape) -> None:
        """The call as captured: padded forward, weighted pseudo-loss, backward, gradients summed into the buffers."""
        autocast = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            predicted = self.encoder(shape.input_ids, shape.attention_mask)  # [B, D]
        residual = (predicted.to(shape.targets.dtype) - shape.targets) * shape.weights[:, None]  # bf16 -> float32
        loss = 0.5 * residual.pow(2).sum()
        grads = torch.autograd.grad(loss, self.params)
        torch._foreach_add_(self.grads, grads)

    def _capture(self, shape: _Shape) -> bool:
        """Captures the shape's graph (capturing runs nothing: the call itself is the replay that follows).
        A backbone whose forward cannot be captured (a host sync in its mask code, say) turns capture off for the
        run, with a warning: the padded call then runs eagerly, exact but not faster."""
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._body(shape)
        except RuntimeError as error:
            self.capture, self.capture_error = False, f"{type(error).__name__}: {error}"
            log.warning("regression graphs off: capture failed", extra={"error": self.capture_error})
            torch.cuda.synchronize(self.device)
            return False
        shape.graph = graph
        self.capture_s += time.perf_counter() - started
        self.captures += 1
        return True

    def _run(self, shape: _Shape) -> None:
        if not self.capture:
            self._body(shape)
            return
        if shape.graph is None and shape.eager_calls < WARMUP_CALLS:  # a real call, on a side stream
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body(shape)
            torch.cuda.current_stream(self.device).wait_stream(side)
            shape.eager_calls += 1
            return
        if shape.graph is None:
            if not self._capture(shape):
                self._body(shape)
                return
        assert shape.graph is not None
        shape.graph.replay()
        self.replays += 1
