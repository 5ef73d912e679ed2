"""DKT-style knowledge-tracing head: a 2-layer LSTM over (item, response) pairs."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from gramrec.models.configs import KnowledgeTracingHeadConfig


class KnowledgeTracingHead(nn.Module):
    """Predicts whether a student answers item t correctly from their answers to items 0..t-1.

    Input at step t: proj(e_t) + response_embedding[r_t]. The state before step t (a learned start state for
    t = 0) is combined with proj(e_t) to give the logit for item t, so every answer, the first one included,
    is a prediction target.
    """

    def __init__(self, item_dim: int, hidden_dim: int = 128, num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.config = KnowledgeTracingHeadConfig(item_dim, hidden_dim, num_layers, dropout)
        self.hidden_dim = hidden_dim
        self.item_projection = nn.Linear(item_dim, hidden_dim)
        self.response_embedding = nn.Embedding(2, hidden_dim)
        self.lstm = nn.LSTM(hidden_dim, hidden_dim, num_layers=num_layers, batch_first=True, dropout=dropout)
        self.start_state = nn.Parameter(torch.zeros(hidden_dim))
        self.output = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )

    def forward(self, item_embeddings: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """item_embeddings: [B, T, D], correct: [B, T] (0/1) -> logits [B, T] for P(correct at t | history < t).

        Padding must be at the end of each row: step t never sees steps > t, so padded steps change nothing.
        """
        items = self.item_projection(item_embeddings)  # [B, T, H]
        steps = items + self.response_embedding(correct.long())  # [B, T, H]
        states, _ = self.lstm(steps)  # [B, T, H]; states[:, t] has seen steps 0..t
        start = self.start_state.expand(states.shape[0], 1, -1)  # [B, 1, H]
        before = torch.cat([start, states[:, :-1]], dim=1)  # [B, T, H]: state before step t
        return self.output(torch.cat([before, items], dim=-1)).squeeze(-1)

    def predict_next(
        self,
        history: torch.Tensor,
        history_correct: torch.Tensor,
        history_mask: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Serving: logits for answering each target item next, after the whole (masked) history.

        history: [B, T, D], history_correct: [B, T], history_mask: [B, T] (real steps first; an all-padding row
        means no history, T >= 1), targets: [B, K, D] -> logits [B, K]. Same function as forward() at t = T.
        """
        state = self.history_state(history, history_correct, history_mask)  # [B, H]
        items = self.item_projection(targets)  # [B, K, H]
        state = state.unsqueeze(1).expand(-1, items.shape[1], -1)  # [B, K, H]
        return self.output(torch.cat([state, items], dim=-1)).squeeze(-1)

    def history_state(
        self, history: torch.Tensor, history_correct: torch.Tensor, history_mask: torch.Tensor
    ) -> torch.Tensor:
        """The LSTM state after each row's (masked) history: [B, T, D], [B, T], [B, T] -> [B, H]; the learned start
        state for an all-padding row."""
        return self.history_state_and_memory(history, history_correct, history_mask)[0]

    def history_state_and_memory(
        self, history: torch.Tensor, history_correct: torch.Tensor, history_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """history_state, and the LSTM's (h, c) of every layer after all T steps ([layers, B, H] each): what
        continue_state needs to add answers one at a time. The memory includes padding steps, so serving keeps it
        only for rows without padding."""
        steps = self.item_projection(history) + self.response_embedding(history_correct.long())  # [B, T, H]
        states, (h, c) = self.lstm(steps)  # [B, T, H]
        start = self.start_state.expand(states.shape[0], 1, -1)  # [B, 1, H]
        states = torch.cat([start, states], dim=1)  # [B, T + 1, H]; index n = state after n answers
        seen = history_mask.long().sum(1)  # [B]
        return states[torch.arange(states.shape[0], device=states.device), seen], h, c  # [B, H]

    def continue_state(
        self, history: torch.Tensor, history_correct: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(state, h, c) after more answers [B, T >= 1, D], [B, T] (no padding), from the (h, c) [layers, B, H] after
        the earlier ones. The state runs over the whole history (no window), so this equals history_state_and_memory
        over the earlier and the new answers together."""
        steps = self.item_projection(history) + self.response_embedding(history_correct.long())  # [B, T, H]
        states, (h, c) = self.lstm(steps, (h, c))
        return states[:, -1], h, c

    def output_parts(self) -> dict[str, torch.Tensor]:
        """The output layer split into a student part and a question part, so serving can score a whole catalog
        with one precomputed [N, H] matrix: logit = w2 · relu(Ws·state + (Wi·Wp)·e + (Wi·bp + b1)) + b2, where
        W1 = [Ws | Wi] is the first output layer over [state; proj(e)] and proj(e) = Wp·e + bp."""
        first, last = cast(nn.Linear, self.output[0]), cast(nn.Linear, self.output[-1])
        hidden = self.hidden_dim
        state_weight, item_weight = first.weight[:, :hidden], first.weight[:, hidden:]  # [H, H] each
        return {
            "state_weight": state_weight,  # [H, H]
            "item_weight": item_weight @ self.item_projection.weight,  # [H, D]
            "item_bias": item_weight @ self.item_projection.bias + first.bias,  # [H]
            "out_weight": last.weight[0],  # [H]
            "out_bias": last.bias,  # [1]
        }
