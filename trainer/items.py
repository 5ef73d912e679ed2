"""The item catalog shared by both tasks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ItemCatalog:
    """Item ids and texts; position in the lists is the item index used everywhere in training."""

    ids: list[str]
    texts: list[str]
    # Optional per-item metadata served with the catalog (MIND: category, subcategory); never used in training.
    metadata: list[dict] | None = field(default=None, repr=False, compare=False)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} item ids but {len(self.texts)} texts")
        if self.metadata is not None and len(self.metadata) != len(self.ids):
            raise ValueError(f"{len(self.ids)} item ids but {len(self.metadata)} metadata entries")
        self.index = {item_id: i for i, item_id in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError(f"duplicate item ids: {_duplicates(self.ids)[:5]}")

    def __len__(self) -> int:
        return len(self.ids)


def _duplicates(ids: list[str]) -> list[str]:
    """Ids occurring more than once, in first-seen order (for error messages)."""
    seen: set[str] = set()
    dups: dict[str, None] = {}
    for item_id in ids:
        if item_id in seen:
            dups[item_id] = None
        seen.add(item_id)
    return list(dups)
