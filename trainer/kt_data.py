"""Knowledge-tracing data: loading student answer sequences and splitting them for evaluation.

Two on-disk formats are accepted:

* the generic format: an items table (``item_id,text``) and an interactions table
  (``user_id,item_id,correct`` plus optional ``timestamp`` and/or ``order``), each CSV or Parquet;
* the CodeWorkout (CSEDM 2021) layout: ``problems.csv`` and ``interactions_merged.csv``.

Errors in user files raise :class:`DataFormatError` with file and line, because a training run that
silently drops bad rows produces metrics nobody can trust.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np

from gramrec.trainer.errors import DataFormatError
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.split_file import is_evaluation_only, no_training_part

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


@dataclass
class KTSequence:
    """One student's answers, in the order they were given."""

    user_id: str
    items: np.ndarray  # int64 item indices, in answer order
    correct: np.ndarray  # int64 0/1, same length

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class KTDataset:
    """All items plus one sequence per user who answered anything."""

    items: ItemCatalog
    sequences: list[KTSequence]


@dataclass
class KTSplits:
    """User-disjoint splits; cold items are hidden from train/val to measure content-based generalisation."""

    train: list[KTSequence]
    val: list[KTSequence]
    test: list[KTSequence]
    cold_items: np.ndarray  # int64 sorted item indices never seen in train/val


# ---------------------------------------------------------------------------------------------
# Table reading (CSV or Parquet) with line numbers for error messages


@dataclass
class _Table:
    """Column-oriented rows of one file, keeping where each row came from."""

    path: Path
    columns: dict[str, list]
    lines: list[int] | None  # CSV line per row; None for Parquet (row number is used instead)
    n_rows: int

    def line(self, row: int) -> int:
        """1-based location of a row: CSV line (header is line 1) or Parquet row number."""
        return self.lines[row] if self.lines is not None else row + 1


def _read_table(path: Path, required: list[str], optional: tuple[str | None, ...] = ()) -> _Table:
    """Read the wanted columns of a CSV or Parquet file, checking required columns exist."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, required, [c for c in optional if c])
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, required, [c for c in optional if c])
    raise DataFormatError(path, None, f"unsupported file type {suffix!r}; use .csv, .parquet or .pq")


def _check_columns(path: Path, header: list[str], required: list[str], line: int | None) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFormatError(
            path, line, f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}"
        )


def _read_csv(path: Path, required: list[str], optional: list[str]) -> _Table:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, None, "empty file (no header row)")
        header = [h.strip() for h in header]
        _check_columns(path, header, required, 1)
        wanted = [c for c in required + optional if c in header]
        positions = [header.index(c) for c in wanted]
        values: list[list[str]] = [[] for _ in wanted]
        lines: list[int] = []
        last_line = reader.line_num
        for row in reader:
            start, last_line = last_line + 1, reader.line_num
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DataFormatError(path, start, f"expected {len(header)} fields, got {len(row)}")
            for column, pos in zip(values, positions):
                column.append(row[pos])
            lines.append(start)
    if not lines:
        raise DataFormatError(path, None, "empty file (header but no data rows)")
    return _Table(path, dict(zip(wanted, values)), lines, len(lines))


def _read_parquet(path: Path, required: list[str], optional: list[str]) -> _Table:
    import pyarrow.parquet as pq

    try:
        header = list(pq.read_schema(path).names)
        _check_columns(path, header, required, None)
        wanted = [c for c in required + optional if c in header]
        table = pq.read_table(path, columns=wanted)
    except DataFormatError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt/empty files
        raise DataFormatError(path, None, f"cannot read Parquet file: {e}") from e
    if table.num_rows == 0:
        raise DataFormatError(path, None, "empty file (no rows)")
    columns = {c: table.column(c).to_pylist() for c in wanted}
    return _Table(path, columns, None, table.num_rows)


# ---------------------------------------------------------------------------------------------
# Value parsing


def _as_id(value: object) -> str:
    """Normalise an id cell to a string; Parquet integer ids become their decimal text."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _parse_correct(value: object) -> int | None:
    """0/1 from 0, 1, true, false (any case) or booleans; None when invalid."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    text = str(value).strip().lower() if value is not None else ""
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    return None


def _number(value: object) -> float | None:
    """A finite float from a number or numeric text, else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _parse_timestamp(value: object) -> float | None:
    """Seconds for sorting, from a number, ISO-8601 text or datetime; naive times are taken as UTC."""
    number = _number(value)
    if number is not None:
        return number
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return None


# ---------------------------------------------------------------------------------------------
# Dataset assembly


@dataclass
class _KTColumns:
    """Which columns hold what, so the generic and CodeWorkout layouts share one code path."""

    item_id: str
    text: str
    user_id: str
    interaction_item_id: str
    correct: str
    timestamp: str | None = None
    order: str | None = None


GENERIC_COLUMNS = _KTColumns("item_id", "text", "user_id", "item_id", "correct", "timestamp", "order")


def _catalog_from_table(table: _Table, cols: _KTColumns) -> ItemCatalog:
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for row, (raw_id, raw_text) in enumerate(zip(table.columns[cols.item_id], table.columns[cols.text])):
        item_id = _as_id(raw_id)
        line = table.line(row)
        if not item_id:
            raise DataFormatError(table.path, line, f"empty {cols.item_id}")
        if item_id in seen:
            raise DataFormatError(
                table.path, line, f"duplicate {cols.item_id} {item_id!r} (first on line {seen[item_id]})"
            )
        text = "" if raw_text is None else str(raw_text)
        if not text.strip():
            raise DataFormatError(table.path, line, f"empty {cols.text} for item {item_id!r}")
        seen[item_id] = line
        ids.append(item_id)
        texts.append(text)
    return ItemCatalog(ids, texts)


def _sort_key(table: _Table, column: str | None, kind: str) -> np.ndarray | None:
    """Float sort key per row from a timestamp/order column, or None when the column is absent."""
    if column is None or column not in table.columns:
        return None
    parse = _parse_timestamp if kind == "timestamp" else _number
    keys = np.empty(table.n_rows, dtype=np.float64)
    for row, raw in enumerate(table.columns[column]):
        key = parse(raw)
        if key is None:
            expected = "ISO-8601 time or number" if kind == "timestamp" else "number"
            raise DataFormatError(table.path, table.line(row), f"bad {column} {raw!r}; expected {expected}")
        keys[row] = key
    return keys


def _sequences_from_table(table: _Table, catalog: ItemCatalog, cols: _KTColumns) -> list[KTSequence]:
    """Group rows by user (first-appearance order) and sort each user's rows by time/order (stable)."""
    n = table.n_rows
    user_codes = np.empty(n, dtype=np.int64)
    items = np.empty(n, dtype=np.int64)
    correct = np.empty(n, dtype=np.int64)
    user_index: dict[str, int] = {}
    columns = (table.columns[cols.user_id], table.columns[cols.interaction_item_id], table.columns[cols.correct])
    for row, (raw_user, raw_item, raw_correct) in enumerate(zip(*columns)):
        user_id, item_id = _as_id(raw_user), _as_id(raw_item)
        if not user_id:
            raise DataFormatError(table.path, table.line(row), f"empty {cols.user_id}")
        if not item_id:
            raise DataFormatError(table.path, table.line(row), f"empty {cols.interaction_item_id}")
        item = catalog.index.get(item_id)
        if item is None:
            raise DataFormatError(
                table.path, table.line(row), f"unknown {cols.interaction_item_id} {item_id!r} (not in items table)"
            )
        label = _parse_correct(raw_correct)
        if label is None:
            raise DataFormatError(
                table.path, table.line(row), f"bad {cols.correct} {raw_correct!r}; expected 0, 1, true or false"
            )
        user_codes[row] = user_index.setdefault(user_id, len(user_index))
        items[row] = item
        correct[row] = label

    keys = [user_codes]  # primary key first
    for column, kind in ((cols.timestamp, "timestamp"), (cols.order, "order")):
        key = _sort_key(table, column, kind)
        if key is not None:
            keys.append(key)
    order = np.lexsort(keys[::-1]) if len(keys) > 1 else np.argsort(user_codes, kind="stable")
    sorted_users = user_codes[order]
    bounds = np.flatnonzero(np.diff(sorted_users)) + 1
    user_ids = list(user_index)
    return [
        KTSequence(user_ids[int(sorted_users[chunk[0]])], items[order[chunk]], correct[order[chunk]])
        for chunk in np.split(np.arange(n), bounds)
    ]


def _load(items_table: _Table, interactions_table: _Table, cols: _KTColumns) -> KTDataset:
    catalog = _catalog_from_table(items_table, cols)
    return KTDataset(catalog, _sequences_from_table(interactions_table, catalog, cols))


def load_kt_tables(items_path: str | Path, interactions_path: str | Path) -> KTDataset:
    """Load the generic KT format (CSV or Parquet by suffix); see the module docstring for columns."""
    cols = GENERIC_COLUMNS
    items_table = _read_table(Path(items_path), [cols.item_id, cols.text])
    interactions_table = _read_table(
        Path(interactions_path), [cols.user_id, cols.interaction_item_id, cols.correct], (cols.timestamp, cols.order)
    )
    return _load(items_table, interactions_table, cols)


def load_codeworkout(folder: str | Path, label_column: str = "FirstAttemptCorrect") -> KTDataset:
    """Load CodeWorkout: item = ProblemID, text = Requirement; file order within a student is answer order."""
    folder = Path(folder)
    cols = _KTColumns("ProblemID", "Requirement", "SubjectID", "ProblemID", label_column)
    items_table = _read_table(folder / "problems.csv", [cols.item_id, cols.text])
    interactions_table = _read_table(
        folder / "interactions_merged.csv", [cols.user_id, cols.interaction_item_id, cols.correct]
    )
    return _load(items_table, interactions_table, cols)


def _find_table(folder: Path, stem: str) -> Path | None:
    """The single ``stem.(csv|parquet|pq)`` file in a folder, or None; several candidates is an error."""
    found = [folder / f"{stem}{s}" for s in CSV_SUFFIXES + PARQUET_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataFormatError(folder, None, f"ambiguous: {', '.join(p.name for p in found)}; keep only one")
    return found[0] if found else None


def load_kt_data(path: str | Path) -> KTDataset:
    """Load a KT folder, detecting the CodeWorkout layout or the generic items/interactions tables."""
    folder = Path(path)
    expected = (
        "a folder with problems.csv + interactions_merged.csv (CodeWorkout) "
        "or items.(csv|parquet) + interactions.(csv|parquet)"
    )
    if not folder.is_dir():
        raise DataFormatError(folder, None, f"not a folder; expected {expected}")
    if (folder / "problems.csv").is_file() and (folder / "interactions_merged.csv").is_file():
        return load_codeworkout(folder)
    items_path, interactions_path = _find_table(folder, "items"), _find_table(folder, "interactions")
    if items_path is None or interactions_path is None:
        raise DataFormatError(folder, None, f"no KT data found; expected {expected}")
    return load_kt_tables(items_path, interactions_path)


# ---------------------------------------------------------------------------------------------
# Splitting


def _check_frac(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _take_count(n: int, frac: float) -> int:
    """round(n * frac), but at least 1 when frac > 0 and at most n - 1, so both sides stay non-empty."""
    if frac <= 0 or n < 2:
        return 0
    return min(max(1, round(n * frac)), n - 1)


def _drop_items(sequence: KTSequence, is_removed: np.ndarray) -> KTSequence:
    keep = ~is_removed[sequence.items]
    return KTSequence(sequence.user_id, sequence.items[keep], sequence.correct[keep])


def split_kt(
    dataset: KTDataset,
    seed: int = 0,
    test_frac: float = 0.2,
    val_frac: float = 0.1,
    cold_item_frac: float = 0.1,
) -> KTSplits:
    """Split users into train/val/test and hold out a set of cold-start items from train/val.

    Test users keep all their answers so the model is scored on cold items it never trained on.
    ``cold_items`` lists every item absent from the final train/val sequences (the sampled cold
    items plus any item that only test users answered or nobody answered).
    """
    for name, value in (("test_frac", test_frac), ("val_frac", val_frac), ("cold_item_frac", cold_item_frac)):
        _check_frac(name, value)
    rng = np.random.default_rng(seed)
    sequences = dataset.sequences
    users = rng.permutation(len(sequences))
    n_test = _take_count(len(users), test_frac)
    test_idx, rest = users[:n_test], users[n_test:]
    n_val = _take_count(len(rest), val_frac)
    val_idx, train_idx = rest[:n_val], rest[n_val:]
    if len(train_idx) == 0:
        raise ValueError(f"too few users ({len(sequences)}) to split")

    n_items = len(dataset.items)
    answered = np.zeros(n_items, dtype=bool)
    for sequence in sequences:
        answered[sequence.items] = True
    candidates = np.flatnonzero(answered)
    chosen = rng.permutation(candidates)[: _take_count(len(candidates), cold_item_frac)]
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[chosen] = True

    def warm(indices: np.ndarray) -> list[KTSequence]:
        kept = (_drop_items(sequences[i], is_cold) for i in np.sort(indices))
        return [s for s in kept if len(s) > 0]

    train, val = warm(train_idx), warm(val_idx)
    seen = np.zeros(n_items, dtype=bool)
    for sequence in train + val:
        seen[sequence.items] = True
    test = [sequences[i] for i in np.sort(test_idx)]
    return KTSplits(train, val, test, np.flatnonzero(~seen).astype(np.int64))


def split_kt_by_users(
    dataset: KTDataset, val_users: frozenset[str], test_users: frozenset[str], folder: str | Path = "."
) -> KTSplits:
    """The split named by a split file: listed users go to val / test, all others train; no cold items are
    sampled (every item a train or val user answered is warm)."""
    parts: dict[str, list[KTSequence]] = {"train": [], "val": [], "test": []}
    for sequence in dataset.sequences:
        part = "test" if sequence.user_id in test_users else "val" if sequence.user_id in val_users else "train"
        parts[part].append(sequence)
    if not parts["train"] and not is_evaluation_only():
        raise no_training_part(folder, "users")
    seen = np.zeros(len(dataset.items), dtype=bool)
    for sequence in parts["train"] + parts["val"]:
        seen[sequence.items] = True
    return KTSplits(parts["train"], parts["val"], parts["test"], np.flatnonzero(~seen).astype(np.int64))
