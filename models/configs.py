"""Each model's own configuration: what rebuilds it with the same shapes and the same function.

Written into every checkpoint (config.json, "model") and every artifact manifest ("model"), and used to rebuild
the model at load time, so a changed default in code can never load old weights into a different model. NRMS's
`num_heads` matters most: it changes no weight shape, so only the saved config tells two models apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class EncoderConfig:
    """The content encoder's pooling over the backbone (the backbone's own config is its Hugging Face config)."""

    pooling: Literal["mean", "attention"]
    dim: int
    attention_dim: int = 200  # additive-attention pooling width (used with pooling "attention")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        return cls(**data)


@dataclass(frozen=True)
class KnowledgeTracingHeadConfig:
    """The DKT-style LSTM head."""

    item_dim: int
    hidden_dim: int = 128
    num_layers: int = 2
    dropout: float = 0.1
    kind: Literal["kt"] = "kt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NewsHeadConfig:
    """The NRMS user encoder: multi-head self-attention and additive attention over the clicked news."""

    item_dim: int
    num_heads: int = 12
    attention_dim: int = 200
    dropout: float = 0.2
    kind: Literal["nr"] = "nr"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HeadConfig = KnowledgeTracingHeadConfig | NewsHeadConfig


def head_config_from_dict(data: dict[str, Any]) -> HeadConfig:
    kinds: dict[str, type[KnowledgeTracingHeadConfig] | type[NewsHeadConfig]] = {
        "kt": KnowledgeTracingHeadConfig,
        "nr": NewsHeadConfig,
    }
    if data.get("kind") not in kinds:
        raise ValueError(f"unknown head kind {data.get('kind')!r}: expected 'kt' or 'nr'")
    return kinds[data["kind"]](**data)


def default_head_config(task: str, item_dim: int, hidden_dim: int = 128) -> HeadConfig:
    """The head a new run of `task` builds: KT's LSTM width is `hidden_dim`; NRMS takes the most heads (of 12, 8,
    4, 2, 1) that divide the item dimension."""
    if task == "kt":
        return KnowledgeTracingHeadConfig(item_dim=item_dim, hidden_dim=hidden_dim)
    if task == "nr":
        return NewsHeadConfig(item_dim=item_dim, num_heads=next(h for h in (12, 8, 4, 2, 1) if item_dim % h == 0))
    raise ValueError(f"unknown task {task!r}: expected 'kt' or 'nr'")
