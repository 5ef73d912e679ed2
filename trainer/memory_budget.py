"""Encoder token caps from a memory budget (TrainSettings.encoder_memory_gib).

Why: on short texts multi-step GRAM's peak memory is set by its encoder calls (4,096-item inference batches, the
regression's micro-batches) on top of a fixed part, not by the CF head; the fixed caps (--encoder-batch-tokens) suit
long texts and leave titles at 54-62% of E2E's peak (BENCHMARKS.md §3). A budget says what the run may take; this
module turns it into the token caps of the two kinds of encoder call, so one setting fits a share of a GPU.

The estimate, in bytes (every term from the encoder's config and the run's sizes, nothing measured at run time):

    fixed    = encoder state: float32 master weights, their gradients, Adam's two moments, bf16 copies of the
               Linear weights under autocast (the regression's snapshots of the weights live in host memory)
             + item tensors: the strategy's [N, D] tables (multi-step GRAM: table and encodings), and the larger of
               an inference encode of all N items (a no-grad encode writes each chunk into its rows of one [N, D]
               output) and a regression's live rows (it reads its targets from the table and re-encodes the
               touched rows REENCODE_CHUNK at a time: one chunk's [C, D]; its float32 checks hold [4096, D], a
               margin); the bottom-layer cache when layers are frozen
             + the CF head with its gradients and Adam moments
             + on CUDA, cuBLAS's workspaces: one set per stream a matmul runs on (the current stream, the graphs'
               warm-up stream and their capture stream), each kept until the process ends
    forward  = tokens x (bytes alive at once inside one layer, no graph kept: the layer's input, the attention
               phase or the MLP phase, whichever is larger)
    backward = tokens x (bytes autograd saves over all layers, the embeddings and the pooling, plus one layer's
               worth of gradients in flight)

Per token and layer, with H hidden, I intermediate, h heads, W the padded width of the batch, e the activations'
element size (2 under CUDA bf16 autocast, else the weights'), f the size of LayerNorm's output (4 under autocast:
LayerNorm runs in float32, else e):

    saved    = (9H + 2I + hW) e + 2H f        (autocast: Q, K and V each save their own bf16 copy of the input)
               (7H + 2I + hW) e + 2H f        (no autocast: the three share it)
    forward  = H f + (2H f + H e + 2I e  or  H f + 6H e + 2hW e, the larger) + 16 (int64 ids and mask)

The hW terms are the attention scores and probabilities of the padded layout as the math kernel builds them
([B, h, W, W]); a packed batch on CUDA (varlen flash attention) has none, and CUDA's memory-efficient kernel does
not keep them either, so there they are a margin. Caps are counted as encode() and the regression count them:
B x W for padded batches (W rounded up to 8 as ItemTokens.batch lays them out), the sum of lengths when packed.

Measured (bench/memory_calibration.py, CPU, torch 2.13, a random MiniLM-shaped BertModel): the bytes autograd saves
for a forward+backward, float32 and CPU bf16 autocast, and the peak of live tensor bytes of a no-grad forward;
the coefficients above were checked against them (results in BENCHMARKS.md §3). Not measured here: CUDA's kernels
and caching allocator (block rounding, fragmentation); `bench/train_bench.py --encoder-memory-gib` reports the GPU
peak next to the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from gramrec.models.content_encoder import PACK_MIN_TOKENS, PAD_MULTIPLE, ContentEncoder, ItemTokens

GIB = 2**30
# A regression reads its targets from the table (no [K, D] copy) and re-encodes the touched rows into the tables
# this many at a time, so the rows it holds at once are one chunk's output, not [K, D].
REENCODE_CHUNK = 16_384
ENCODE_ROWS = 1  # [K, D] tensors a no-grad encode of K items holds at its end: its output (ContentEncoder.encode)
IDS_AND_MASK = 16  # int64 token ids and attention mask of the padded batch
# cuBLAS workspaces of one stream used by a forward (the calling thread's handle) and a backward (the autograd
# engine's): 65 MiB on an H100, torch 2.11 (bench/graph_memory_probe.py, BENCHMARKS.md §3 sixth session).
CUBLAS_WORKSPACES_PER_STREAM = 65 * 2**20
TRAINING_STREAMS = 3  # the current stream, the warm-up side stream, the graphs' capture stream


class MemoryBudgetError(ValueError):
    """The budget cannot hold the fixed part of the run, or not even one item's encoder call."""


@dataclass(frozen=True)
class EncoderShape:
    """What the estimate needs of the encoder: sizes from its config, parameter counts and element sizes."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    pooling_dim: int  # additive attention pooling's width (0 for mean pooling)
    params: int  # all parameters
    trainable: int  # parameters with gradients (frozen bottom layers excluded)
    linear_params: int  # Linear weights and biases (autocast keeps a bf16 copy of each)
    weight_bytes: int  # element size of the master weights

    @classmethod
    def of(cls, encoder: ContentEncoder) -> EncoderShape:
        config = encoder.backbone.config
        params = list(encoder.parameters())
        linear = sum(p.numel() for m in encoder.modules() if isinstance(m, nn.Linear) for p in m.parameters())
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            pooling_dim=encoder.attention_dim if encoder.attention_pool is not None else 0,
            params=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            linear_params=linear,
            weight_bytes=params[0].element_size(),
        )


@dataclass(frozen=True)
class Precision:
    """Element sizes of the activations: e for matmul inputs and outputs, f for LayerNorm's outputs."""

    e: int
    f: int

    @classmethod
    def of(cls, shape: EncoderShape, autocast: bool) -> Precision:
        return cls(e=2, f=4) if autocast else cls(e=shape.weight_bytes, f=shape.weight_bytes)


def saved_bytes_per_token(shape: EncoderShape, precision: Precision, width: int, autocast: bool) -> int:
    """Bytes autograd keeps per token for a backward: every layer, the embeddings and the pooling."""
    h, i, e, f = shape.hidden, shape.intermediate, precision.e, precision.f
    inputs = 9 * h if autocast else 7 * h  # Q, K, V each cast their input under autocast
    layer = (inputs + 2 * i + shape.heads * width) * e + 2 * h * f
    embeddings = h * f + 3 * 8 + IDS_AND_MASK  # LayerNorm input; word, position and type ids
    pooling = 2 * h * f + 2 * shape.pooling_dim * e
    return shape.layers * layer + embeddings + pooling


def forward_bytes_per_token(shape: EncoderShape, precision: Precision, width: int) -> int:
    """Bytes alive at once per token in a no-grad forward: the layer's input and its larger phase."""
    h, i, e, f = shape.hidden, shape.intermediate, precision.e, precision.f
    mlp = 2 * h * f + h * e + 2 * i * e
    attention = h * f + 6 * h * e + 2 * shape.heads * width * e
    return max(mlp, attention) + h * f + IDS_AND_MASK


def backward_bytes_per_token(shape: EncoderShape, precision: Precision, width: int, autocast: bool) -> int:
    """Saved tensors plus one layer's gradients in flight during the backward."""
    saved = saved_bytes_per_token(shape, precision, width, autocast)
    h, i, e, f = shape.hidden, shape.intermediate, precision.e, precision.f
    in_flight = 2 * h * f + 2 * i * e + shape.heads * width * e
    return saved + in_flight


def encoder_state_bytes(shape: EncoderShape, autocast: bool, finetunes: bool, head_params: int) -> dict[str, int]:
    """The fixed bytes of the encoder's and the CF head's parameters and optimizer state (the encoder's gradients
    and Adam moments only when the strategy fine-tunes it)."""
    w = shape.weight_bytes
    parts = {"encoder_weights": shape.params * w, "head_weights_grads_adam": 4 * head_params * 4}
    if finetunes:
        parts |= {"encoder_grads": shape.trainable * w, "encoder_adam": 2 * shape.trainable * w}
    if autocast:
        parts["bf16_weight_copies"] = shape.linear_params * 2
    return parts


def item_bytes(
    num_items: int, dim: int, tables: int, regresses: bool, cache_tokens: int = 0, cache_bytes: int = 2
) -> dict[str, int]:
    """The fixed bytes of item tensors: `tables` [N, D] float32 tables, the regression's rows, a whole-catalog
    encode, the bottom-layer cache of `cache_tokens` tokens (`cache_bytes` per element)."""
    row = dim * 4
    # A whole-catalog encode and a regression never run at once: the larger of the two counts.
    if regresses:
        parts = {"regression_rows": min(num_items, REENCODE_CHUNK) * row}
    else:
        parts = {"inference_encode_rows": ENCODE_ROWS * num_items * row}
    if tables:
        parts["item_tables"] = tables * num_items * row + num_items * 9  # + multi-step GRAM's row versions, marks
    if cache_tokens:
        parts["bottom_cache"] = cache_tokens * dim * cache_bytes
    return parts


def padded_width(tokens: ItemTokens, encoder: ContentEncoder, device: torch.device) -> int:
    """The widest padded batch an encode may build (0 when every batch is packed, which has no score matrix)."""
    longest = int(tokens.lengths.max()) if len(tokens) else 1
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    if encoder.attention == "packed" and device.type == "cuda":
        return 0  # varlen flash attention: no [B, h, W, W] scores (on the CPU packed attention pads internally)
    if encoder.attention == "auto" and device.type == "cuda":
        return min(width, -(-PACK_MIN_TOKENS // PAD_MULTIPLE) * PAD_MULTIPLE)  # longer batches are packed
    return width


@dataclass
class MemoryPlan:
    """The chosen caps and the estimate behind them (logged, and reported by the training benchmark)."""

    budget_bytes: int
    fixed: dict[str, int]
    forward_bytes_per_token: int
    backward_bytes_per_token: int
    forward_tokens: int  # token cap of a no-grad encoder call
    backward_tokens: int | None  # token cap of a call whose graph is kept for a backward (None: not bounded)
    notes: list[str] = field(default_factory=list)
    regression_graphs: bool = False  # the regression's CUDA graphs fit (their memory is counted above)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    def estimate(self, tokens: int, backward: bool) -> int:
        """Peak bytes by this estimate of one encoder call of `tokens` tokens."""
        per_token = self.backward_bytes_per_token if backward else self.forward_bytes_per_token
        return self.fixed_bytes + tokens * per_token

    def as_dict(self) -> dict:
        return asdict(self) | {"fixed_bytes": self.fixed_bytes}


def plan_caps(
    budget_gib: float,
    shape: EncoderShape,
    fixed: dict[str, int],
    width: int,
    autocast: bool,
    max_tokens: int | None,
    min_tokens: int,
    bounds_backward: bool = True,
    graphs_held: bool = False,
) -> MemoryPlan:
    """Token caps so that fixed + one call's activations <= the budget (never above `max_tokens`, the fixed cap).

    min_tokens: the longest single item (a call holds at least one item, so a smaller cap cannot be kept).
    graphs_held: the backward calls run as CUDA graphs whose private memory pool keeps their activations for the
    whole run, so a forward call's come on top of them: each kind of call gets half of the free memory."""
    budget = round(budget_gib * GIB)
    precision = Precision.of(shape, autocast)
    fwd = forward_bytes_per_token(shape, precision, width)
    bwd = backward_bytes_per_token(shape, precision, width, autocast)
    free = budget - sum(fixed.values())
    share = free // 2 if graphs_held else free
    largest = max(fixed, key=fixed.__getitem__)
    if share < min_tokens * (bwd if bounds_backward else fwd):
        raise MemoryBudgetError(
            f"encoder_memory_gib={budget_gib:g} cannot hold this run: its fixed part alone is estimated at "
            f"{sum(fixed.values()) / GIB:.2f} GiB (largest: {largest} {fixed[largest] / GIB:.2f} GiB), and one "
            f"encoder call of the longest item ({min_tokens} tokens) needs "
            f"{min_tokens * (bwd if bounds_backward else fwd) / GIB:.3f} GiB more; raise encoder_memory_gib"
        )
    cap = max_tokens if max_tokens is not None else math.inf
    forward_tokens = int(min(cap, share // fwd))
    backward_tokens = int(min(cap, share // bwd)) if bounds_backward else None
    return MemoryPlan(budget, fixed, fwd, bwd, forward_tokens, backward_tokens, regression_graphs=graphs_held)


def plan_for_strategy(
    budget_gib: float,
    encoder: ContentEncoder,
    tokens: ItemTokens,
    device: torch.device,
    head: nn.Module,
    tables: int,
    regresses: bool,
    max_tokens: int | None,
    cache_tokens: int = 0,
    finetunes: bool = True,
    regression_graphs: bool = False,
) -> MemoryPlan:
    """The plan of a training strategy that keeps `tables` [N, D] item tables; `regresses` for multi-step GRAM (its
    training encodes are bounded too); `cache_tokens`: tokens of the bottom-layer cache (frozen layers);
    `finetunes`: the strategy trains the encoder (gradients, Adam moments); `regression_graphs`: the regression
    would replay CUDA graphs (trainer/encoder_graphs.py). Their gradient buffers and held activations are
    counted when the budget holds them; when it does not, the plan says so (`regression_graphs` False: the caller
    runs the regression eagerly) rather than refusing a budget the eager regression fits."""
    autocast = device.type == "cuda"  # every training encode runs under bf16 autocast on CUDA
    shape = EncoderShape.of(encoder)
    head_params = sum(p.numel() for p in head.parameters())
    fixed = encoder_state_bytes(shape, autocast, finetunes, head_params)
    cache_bytes = 2 if autocast else shape.weight_bytes
    fixed |= item_bytes(len(tokens), encoder.dim, tables, regresses, cache_tokens, cache_bytes)
    if device.type == "cuda":
        fixed["cublas_workspaces"] = TRAINING_STREAMS * CUBLAS_WORKSPACES_PER_STREAM
    longest = -(-int(tokens.lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE if len(tokens) else 1
    width = padded_width(tokens, encoder, device)
    if regresses and regression_graphs and device.type == "cuda":  # on a CPU the padded call runs eagerly
        # The graphs sum their gradients into buffers that .grad points at (encoder_grads above); what they add is
        # the gradients their backward makes before summing them, kept in their pool: one set of trained weights.
        graphed = fixed | {"regression_graph_gradients": shape.trainable * shape.weight_bytes}
        try:
            return plan_caps(budget_gib, shape, graphed, width, autocast, max_tokens, longest, graphs_held=True)
        except MemoryBudgetError:
            plan = plan_caps(budget_gib, shape, fixed, width, autocast, max_tokens, longest)
            plan.notes.append("the regression's CUDA graphs do not fit this budget: the regression runs eagerly")
            return plan
    return plan_caps(budget_gib, shape, fixed, width, autocast, max_tokens, longest, bounds_backward=regresses)
