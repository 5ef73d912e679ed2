"""An explicit split shipped with a data folder (`split.json`), used instead of the task's default split.

The retrain loop writes one so that the gate's held-out slice is the most recent users (kt) or impressions (nr),
and both the new and the active model are scored on exactly that slice:

    {"val": ["<user id or impression id>", ...], "test": [...]}     everything else trains
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gramrec.trainer.errors import DataFormatError

SPLIT_FILE = "split.json"

# Set while `gramrec evaluate` builds its run: a split file may then leave no training part, and MIND behaviors
# may have no times (the split file, not the time, decides the parts).
_EVALUATION_ONLY = contextvars.ContextVar("evaluation_only", default=False)


@contextmanager
def evaluation_only() -> Iterator[None]:
    token = _EVALUATION_ONLY.set(True)
    try:
        yield
    finally:
        _EVALUATION_ONLY.reset(token)


def is_evaluation_only() -> bool:
    return _EVALUATION_ONLY.get()


def no_training_part(folder: str | Path, what: str) -> DataFormatError:
    return DataFormatError(
        Path(folder) / SPLIT_FILE,
        None,
        f"the split leaves no training {what} (every id is in val or test); training needs some, "
        "`gramrec evaluate` does not",
    )


@dataclass(frozen=True)
class ExplicitSplit:
    val: frozenset[str]
    test: frozenset[str]


def read_split(folder: str | Path) -> ExplicitSplit | None:
    """The folder's split.json, validated; None when the folder has none."""
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(path, None, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"val", "test"}:
        raise DataFormatError(path, None, 'expected an object with lists "val" and "test" and nothing else')
    parts = {}
    for name in ("val", "test"):
        keys = data.get(name, [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise DataFormatError(path, None, f'"{name}" must be a list of id strings')
        parts[name] = frozenset(keys)
    if parts["val"] & parts["test"]:
        raise DataFormatError(path, None, f"ids in both val and test: {sorted(parts['val'] & parts['test'])[:5]}")
    return ExplicitSplit(parts["val"], parts["test"])


def write_split(folder: str | Path, val: list[str], test: list[str]) -> None:
    (Path(folder) / SPLIT_FILE).write_text(json.dumps({"val": val, "test": test}))
