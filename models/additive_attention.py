"""Additive attention pooling (Bahdanau-style), the pooling NRMS uses for words and for news."""

import torch
from torch import nn


class AdditiveAttention(nn.Module):
    """Pools a masked sequence of vectors into one vector with learned attention weights.

    score_i = q . tanh(W x_i + b); weights = softmax over unmasked positions; out = sum_i weights_i x_i.
    """

    def __init__(self, dim: int, attention_dim: int = 200):
        super().__init__()
        self.projection = nn.Linear(dim, attention_dim)
        self.query = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D], mask: [B, L] (True/1 = real position) -> [B, D].

        A row with no real position pools to zeros instead of NaN.
        """
        scores = self.query(torch.tanh(self.projection(x))).squeeze(-1)  # [B, L]
        mask = mask.bool()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask.to(scores.dtype)  # zero for empty rows
        return torch.einsum("bl,bld->bd", weights.to(x.dtype), x)
