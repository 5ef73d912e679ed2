"""NRMS user encoder: multi-head self-attention over clicked news, additive attention -> user vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gramrec.models.additive_attention import AdditiveAttention
from gramrec.models.configs import NewsHeadConfig


class NewsSelfAttention(nn.Module):
    """Multi-head self-attention over a user's clicked news, masking padded positions."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"item dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D], mask: [B, L] (True = real) -> [B, L, D]"""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, L, d]
        # Rows with no real key would softmax over nothing; let them attend to every position instead
        # (their output is discarded by the masked pooling anyway).
        key_mask = mask.bool() | ~mask.bool().any(-1, keepdim=True)  # [B, L]
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # [B, h, L, d]
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class NewsHead(nn.Module):
    """Scores candidate news for a reader: dot(user vector, candidate embedding)."""

    def __init__(self, item_dim: int, num_heads: int = 12, attention_dim: int = 200, dropout: float = 0.2):
        super().__init__()
        self.config = NewsHeadConfig(item_dim, num_heads, attention_dim, dropout)
        self.dropout = nn.Dropout(dropout)
        self.self_attention = NewsSelfAttention(item_dim, num_heads, dropout)
        self.pool = AdditiveAttention(item_dim, attention_dim)

    def user_vector(self, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """history: [B, L, D] clicked-news embeddings, history_mask: [B, L] -> [B, D] (zeros for no history)."""
        attended = self.self_attention(self.dropout(history), history_mask)  # [B, L, D]
        return self.pool(self.dropout(attended), history_mask)

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """history: [B, L, D], history_mask: [B, L], candidates: [B, C, D] -> click scores [B, C]"""
        user = self.user_vector(history, history_mask)  # [B, D]
        return torch.einsum("bd,bcd->bc", user, candidates)
