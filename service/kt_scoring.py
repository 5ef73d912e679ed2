"""The kt head's output layer split into a question part and a student part, for scoring a whole catalog.

The head's logit for question e after a history is w2 · relu(W1 [state; Wp·e + bp] + b1) + b2. Its first layer is
linear in each half, so with W1 = [Ws | Wi]: w2 · relu(Ws·state + (Wi·Wp)·e + (Wi·bp + b1)) + b2. The question part
`item_terms(e)` = (Wi·Wp)·e + (Wi·bp + b1) is computed once per version and item (service/catalog.py); a request
then costs the LSTM over its history (kt_state.onnx) and one [N, H] add, relu and matrix-vector product, instead of
projecting every one of the N questions through the head (BENCHMARKS.md §5). The parts are exported and checked
against the head by trainer/export.py (models/knowledge_tracing_head.py, output_parts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_safetensors

PARTS = ("state_weight", "item_weight", "item_bias", "out_weight", "out_bias")


@dataclass(frozen=True)
class KTOutputLayer:
    state_weight: np.ndarray  # [H, H]
    item_weight: np.ndarray  # [H, D]
    item_bias: np.ndarray  # [H]
    out_weight: np.ndarray  # [H]
    out_bias: float

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> KTOutputLayer:
        """Reads kt_output.safetensors; raises ValueError naming a missing or misshapen part."""
        arrays = load_safetensors(data)
        missing = [name for name in PARTS if name not in arrays]
        if missing:
            raise ValueError(f"missing parts {missing}")
        parts = {name: np.ascontiguousarray(arrays[name], np.float32) for name in PARTS}
        hidden = parts["item_bias"].shape[0]
        shapes = {
            "state_weight": (hidden, hidden),
            "item_weight": (hidden, dim),
            "item_bias": (hidden,),
            "out_weight": (hidden,),
            "out_bias": (1,),
        }
        for name, shape in shapes.items():
            if parts[name].shape != shape:
                raise ValueError(f"{name} has shape {list(parts[name].shape)}, expected {list(shape)}")
        return cls(
            parts["state_weight"],
            parts["item_weight"],
            parts["item_bias"],
            parts["out_weight"],
            float(parts["out_bias"][0]),
        )

    @property
    def hidden(self) -> int:
        return int(self.item_bias.shape[0])

    def item_terms(self, vectors: np.ndarray) -> np.ndarray:
        """Question parts of item embeddings: [n, D] -> [n, H] float32."""
        return np.asarray(vectors, np.float32) @ self.item_weight.T + self.item_bias

    def probabilities(self, state: np.ndarray, item_terms: np.ndarray) -> np.ndarray:
        """P(correct) of each question after the history whose LSTM state is `state` [H]: item_terms [n, H] -> [n]."""
        hidden = item_terms + self.state_weight @ state
        np.maximum(hidden, 0.0, out=hidden)
        logits = hidden @ self.out_weight + self.out_bias
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function, overflow-free (as bundle._sigmoid)
