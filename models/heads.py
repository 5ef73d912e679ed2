"""Builds the CF head of a task, so training, evaluation and export construct it the same way."""

from torch import nn

from gramrec.models.configs import (
    HeadConfig,
    KnowledgeTracingHeadConfig,
    NewsHeadConfig,
    default_head_config,
)
from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.models.news_head import NewsHead


def build_head(task: str, item_dim: int, hidden_dim: int = 128) -> nn.Module:
    """A new run's head (see models.configs.default_head_config)."""
    return head_from_config(default_head_config(task, item_dim, hidden_dim))


def head_from_config(config: HeadConfig) -> nn.Module:
    """The head a saved config describes."""
    if isinstance(config, KnowledgeTracingHeadConfig):
        return KnowledgeTracingHead(config.item_dim, config.hidden_dim, config.num_layers, config.dropout)
    if isinstance(config, NewsHeadConfig):
        return NewsHead(config.item_dim, config.num_heads, config.attention_dim, config.dropout)
    raise TypeError(f"not a head config: {config!r}")
