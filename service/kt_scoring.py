"""The kt head's output layer split into a question part and a student part, for scoring a whole catalog.

The head's logit for question e after a history is w2 · relu(W1 [state; Wp·e + bp] + b1) + b2. Its first layer is
linear in each half, so with W1 = [Ws | Wi]: w2 · relu(Ws·state + (Wi·Wp)·e + (Wi·bp + b1)) + b2. The question part
`item_terms(e)` = (Wi·Wp)·e + (Wi·bp + b1) is computed once per version and item (service/catalog.py); a request
then costs the LSTM over its history (kt_state.onnx) and one [N, H] add, relu and matrix-vector product, instead of
projecting every one of the N questions through the head (BENCHMARKS.md §5). The parts are exported and checked
against the head by trainer/export.py (models/knowledge_tracing_head.py, output_parts).

Both paths end in the version's calibration (`KTCalibration`, kt_calibration.json), so /predict and /recommend
serve the same calibrated probabilities.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load as load_safetensors

PARTS = ("state_weight", "item_weight", "item_bias", "out_weight", "out_bias")
CALIBRATION_METHOD = "platt"


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class KTCalibration:
    """P(correct) = sigmoid(a * logit + b) of the kt head's logit: Platt scaling, fitted on validation at export.

    a > 0 keeps it monotone (rankings and AUC unchanged). Platt rather than a temperature (b = 0) because the
    first-start model's probabilities are both squeezed and shifted (BENCHMARKS.md §5: ~0.09 too high), and a
    temperature alone cannot move the mean. Versions exported without it serve the head's own sigmoid (identity).
    """

    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.a > 0:
            raise ValueError(f"a must be > 0 (a monotone calibration), got {self.a!r}")

    @property
    def is_identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(correct) of head logits, same shape and float dtype."""
        logits = np.asarray(logits)
        if self.is_identity:
            return sigmoid(logits)
        return sigmoid(logits * logits.dtype.type(self.a) + logits.dtype.type(self.b))

    def to_dict(self) -> dict:
        return {"method": CALIBRATION_METHOD, "a": float(self.a), "b": float(self.b)}

    @classmethod
    def from_bytes(cls, data: bytes) -> KTCalibration:
        """Reads kt_calibration.json: {"method": "platt", "a": > 0, "b": finite}, other keys (how it was fitted)
        ignored; raises ValueError for anything else, NaN and Infinity included (Python's JSON reader takes them)."""

        def refuse(constant: str) -> float:
            raise ValueError(f"{constant} is not a number")

        try:
            config = json.loads(data, parse_constant=refuse)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError("must be a JSON object")
        if config.get("method") != CALIBRATION_METHOD:
            raise ValueError(f"method must be {CALIBRATION_METHOD!r}, got {config.get('method')!r}")
        missing = [name for name in ("a", "b") if name not in config]
        if missing:
            raise ValueError(f"missing {missing}")
        return cls(config["a"], config["b"])


IDENTITY = KTCalibration()


@dataclass(frozen=True)
class KTOutputLayer:
    state_weight: np.ndarray  # [H, H]
    item_weight: np.ndarray  # [H, D]
    item_bias: np.ndarray  # [H]
    out_weight: np.ndarray  # [H]
    out_bias: float
    calibration: KTCalibration = field(default=IDENTITY)

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

    def logits(self, state: np.ndarray, item_terms: np.ndarray) -> np.ndarray:
        """The head's logit of each question after the history whose LSTM state is `state` [H]: [n, H] -> [n]."""
        hidden = item_terms + self.state_weight @ state
        np.maximum(hidden, 0.0, out=hidden)
        return hidden @ self.out_weight + self.out_bias

    def probabilities(self, state: np.ndarray, item_terms: np.ndarray) -> np.ndarray:
        """Calibrated P(correct) of each question (as ModelBundle.predict_kt): item_terms [n, H] -> [n]."""
        return self.calibration.probabilities(self.logits(state, item_terms))
