"""Padding-free ("packed") attention for Hugging Face encoders.

A batch of B texts of lengths n_1..n_B is laid out as one row of T = sum(n_i) tokens: [1, T]. The linear layers,
layer norms and MLPs then work on exactly T tokens instead of B x max(n_i), and only attention needs to know
where one text ends and the next begins: `cu_seq_lens` [B + 1] (int32, 0, n_1, n_1 + n_2, ..., T).

The attention function is registered with transformers' `AttentionInterface` under `PACKED_ATTENTION`, and
gets the boundaries through the same keyword arguments as transformers' padding-free flash-attention path
(`cu_seq_lens_q/k`, `max_length_q/k`), which the model passes through untouched to every attention layer.
Kernels, in order of preference:
  1. `torch.nn.attention.varlen.varlen_attn` (flash attention on variable-length sequences, forward and
     backward) when the inputs are CUDA fp16/bf16 and attention dropout is off;
  2. aten's flash-attention op on the same layout when attention dropout is on (varlen_attn has no dropout);
  3. otherwise (CPU, float32/float64, older torch): scatter to padded [B, H, max_len, d], run SDPA with a key
     padding mask, gather back. Exact and portable; the rest of the model still runs packed.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

PACKED_ATTENTION = "gramrec_packed"


@dataclass
class PackedBatch:
    """B texts laid end to end. Built on the CPU by `ItemTokens.packed`, moved with `to()`.

    `max_length` and `lengths` stay host-side so the kernels get their maximum length without a device sync.
    """

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarts at 0 for every text
    token_batch: torch.Tensor  # [T] int64, which text each token belongs to
    cu_seq_lens: torch.Tensor  # [B + 1] int32
    lengths: torch.Tensor  # [B] int64, on the CPU
    max_length: int

    @property
    def num_texts(self) -> int:
        return len(self.lengths)

    def to(self, device: torch.device) -> PackedBatch:
        """Moves the index tensors in two copies (one stacked int64 block, one int32), asynchronously from pinned
        memory on CUDA."""
        if device.type == "cpu":
            return self
        stacked = torch.stack([self.input_ids[0], self.position_ids[0], self.token_batch])  # [3, T]
        cu = self.cu_seq_lens
        if device.type == "cuda":
            stacked, cu = stacked.pin_memory(), cu.pin_memory()
        stacked = stacked.to(device, non_blocking=True)
        return PackedBatch(
            input_ids=stacked[0:1],
            position_ids=stacked[1:2],
            token_batch=stacked[2],
            cu_seq_lens=cu.to(device, non_blocking=True),
            lengths=self.lengths,
            max_length=self.max_length,
        )

    def attention_kwargs(self) -> dict:
        """The keyword arguments every attention layer receives (transformers' padding-free names)."""
        return {
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }

    def to_padded(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] per-token values -> [B, max_length, ...], zeros at padding (differentiable)."""
        padded = packed.new_zeros(self.num_texts, self.max_length, *packed.shape[1:])
        return padded.index_put((self.token_batch, self.position_ids[0]), packed)

    def padding_mask(self) -> torch.Tensor:
        """[B, max_length] int64, 1 at real tokens; from cu_seq_lens, on their device (no host transfer)."""
        lengths = self.cu_seq_lens[1:] - self.cu_seq_lens[:-1]  # [B]
        positions = torch.arange(self.max_length, device=self.cu_seq_lens.device)
        return (positions[None, :] < lengths[:, None]).long()


def _load_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn where this torch has it (2.10+), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# Looked up once at import: plain module constants keep the attention function traceable by torch.compile.
_VARLEN_ATTN = _load_varlen_attn()
_VARLEN_TAKES_SCALE = _VARLEN_ATTN is not None and "scale" in inspect.signature(_VARLEN_ATTN).parameters
_FLASH_OP = hasattr(torch.ops.aten, "_flash_attention_forward")


def _varlen_attn():
    return _VARLEN_ATTN


def _flash_op_available() -> bool:
    return _FLASH_OP


def kernel_for(query: torch.Tensor, dropout: float) -> str:
    """Which kernel `packed_attention_forward` runs for this query ([1, H, T, d]) and dropout: varlen | flash | padded."""
    fast = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
    if fast and dropout == 0.0 and _VARLEN_ATTN is not None:
        return "varlen"
    if fast and dropout > 0.0 and _FLASH_OP:
        return "flash"
    return "padded"


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, H, T, d] (one packed row) -> ([1, T, H, d], None), as transformers' attention
    functions return. Texts attend only within themselves (bidirectionally)."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(f"{PACKED_ATTENTION} attention needs cu_seq_lens_q and max_length_q (a PackedBatch)")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    # [1, H, T, d] -> [T, H, d]: for transformers' `.view(..).transpose(1, 2)` projections this is a free view.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    kernel = kernel_for(query, dropout)
    if kernel == "varlen":
        extra = {"scale": scaling} if scaling is not None and _VARLEN_TAKES_SCALE else {}
        out = _VARLEN_ATTN(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
    elif kernel == "flash":
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_seq_lens_q,
            cu_seq_lens_q,
            max_length_q,
            max_length_q,
            dropout,
            False,
            return_debug_mask=False,
            scale=scaling,
        )[0]
    else:
        out = _padded_attention(q, k, v, cu_seq_lens_q, max_length_q, dropout, scaling)
    return out.unsqueeze(0), None


def _padded_attention(q, k, v, cu_seq_lens: torch.Tensor, max_length: int, dropout: float, scaling) -> torch.Tensor:
    """Reference / fallback: [T, H, d] -> pad to [B, H, L, d] -> SDPA with a key padding mask -> [T, H, d]."""
    total = q.shape[0]
    lengths = cu_seq_lens[1:] - cu_seq_lens[:-1]  # [B]
    num_texts = lengths.shape[0]
    # output_size avoids a device sync for the size of the result
    token_batch = torch.repeat_interleave(torch.arange(num_texts, device=q.device), lengths.long(), output_size=total)
    position = torch.arange(total, device=q.device) - cu_seq_lens.long()[token_batch]

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, H, d] -> [B, H, L, d]
        padded = x.new_zeros(num_texts, max_length, *x.shape[1:])
        return padded.index_put((token_batch, position), x).transpose(1, 2)

    keep = torch.arange(max_length, device=q.device)[None, :] < lengths[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], dropout_p=dropout, scale=scaling
    )  # [B, H, L, d]
    return out.transpose(1, 2)[token_batch, position]  # [T, H, d]


def register() -> None:
    """Makes `PACKED_ATTENTION` a valid attention implementation (idempotent). No mask function is registered:
    transformers then builds no attention mask, which is what a packed row needs."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


@contextmanager
def packed_attention(model: PreTrainedModel):
    """Routes `model`'s attention layers to the packed kernel for the duration of a forward.

    Switching per call (rather than once at load time) leaves every other use of the model (padded batches,
    ONNX export, serving) on the implementation it was loaded with.
    """
    register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
