"""Builds the CF head of a task, so training, evaluation and export construct it the same way."""

from torch import nn

from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.models.news_head import NewsHead


def build_head(task: str, item_dim: int, hidden_dim: int = 128) -> nn.Module:
    if task == "kt":
        return KnowledgeTracingHead(item_dim, hidden_dim=hidden_dim)
    if task == "nr":
        num_heads = next(h for h in (12, 8, 4, 2, 1) if item_dim % h == 0)
        return NewsHead(item_dim, num_heads=num_heads)
    raise ValueError(f"unknown task {task!r}: expected 'kt' or 'nr'")
