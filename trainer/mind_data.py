"""MIND news-recommendation data: news texts, impressions, and a time-based split.

Files are parsed by splitting lines on tabs (no CSV quoting): MIND titles contain bare quotes that
a CSV reader would misinterpret and silently merge rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np

from gramrec.trainer.errors import DataFormatError
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.split_file import is_evaluation_only, no_training_part

NEWS_FILE = "news.tsv"
BEHAVIORS_FILE = "behaviors.tsv"
_MIN_NEWS_COLUMNS = 4  # nid, category, subcategory, title (abstract and the rest are optional)
_BEHAVIOR_COLUMNS = 5
_TIME = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4}) (\d{1,2}):(\d{2}):(\d{2}) ([AP]M)")


@dataclass
class Impression:
    """One page view: what the user had clicked before, and which shown news they clicked now."""

    impression_id: str
    user_id: str
    time: datetime | None  # None only in test-only data read for evaluation, where split.json names the parts
    history: np.ndarray  # int64 item indices of clicked news, oldest first
    candidates: np.ndarray  # int64 item indices
    labels: np.ndarray  # int64 0/1, same length as candidates


@dataclass
class MindDataset:
    """All news as items (referenced or not) plus the impressions in file order."""

    items: ItemCatalog
    impressions: list[Impression]


@dataclass
class MindSplits:
    """Time-ordered splits, so evaluation never peeks at the future."""

    train: list[Impression]
    val: list[Impression]
    test: list[Impression]


def _tsv_rows(path: Path):
    """Yield (line number, fields) for non-empty lines, splitting only on '\\n' and '\\t'."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataFormatError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, f"not valid UTF-8: {e}") from e
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line:
            yield number, line.split("\t")


def _load_news(path: Path, use_abstract: bool) -> ItemCatalog:
    ids: list[str] = []
    texts: list[str] = []
    metadata: list[dict] = []
    first_line: dict[str, int] = {}
    for number, fields in _tsv_rows(path):
        if len(fields) < _MIN_NEWS_COLUMNS:
            problem = f"expected at least {_MIN_NEWS_COLUMNS} tab-separated columns, got {len(fields)}"
            raise DataFormatError(path, number, problem)
        nid, title = fields[0].strip(), fields[3].strip()
        if not nid:
            raise DataFormatError(path, number, "empty news id")
        if nid in first_line:
            raise DataFormatError(path, number, f"duplicate news id {nid!r} (first on line {first_line[nid]})")
        if not title:
            raise DataFormatError(path, number, f"empty title for news {nid!r}")
        abstract = fields[4].strip() if use_abstract and len(fields) > 4 else ""
        first_line[nid] = number
        ids.append(nid)
        texts.append(f"{title} {abstract}" if abstract else title)
        category, subcategory = fields[1].strip(), fields[2].strip()
        metadata.append({k: v for k, v in (("category", category), ("subcategory", subcategory)) if v})
    if not ids:
        raise DataFormatError(path, None, "empty file (no news)")
    return ItemCatalog(ids, texts, metadata=metadata)


def _parse_time(text: str) -> datetime | None:
    """MIND's 'M/D/YYYY h:mm:ss AM' format; a regex is several times faster than strptime."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        return None
    month, day, year, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not 1 <= hour <= 12:
        return None
    hour = hour % 12 + (12 if match.group(7) == "PM" else 0)
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


def _lookup(path: Path, number: int, index: dict[str, int], nids: list[str]) -> np.ndarray:
    """Item indices of news ids, failing on the first id absent from news.tsv."""
    try:
        return np.array([index[nid] for nid in nids], dtype=np.int64)
    except KeyError as e:
        raise DataFormatError(path, number, f"news id {e.args[0]!r} not found in {NEWS_FILE}") from None


def _parse_candidates(path: Path, number: int, field: str) -> tuple[list[str], np.ndarray]:
    """Split 'N1-0 N2-1' into news ids and 0/1 labels."""
    nids: list[str] = []
    labels: list[int] = []
    for token in field.split():
        nid, sep, label = token.rpartition("-")
        if not sep or not nid or label not in ("0", "1"):
            raise DataFormatError(path, number, f"bad impression token {token!r}; expected NEWSID-0 or NEWSID-1")
        nids.append(nid)
        labels.append(label == "1")
    if not nids:
        raise DataFormatError(path, number, "impression has no candidates")
    return nids, np.array(labels, dtype=np.int64)


def _load_behaviors(path: Path, catalog: ItemCatalog, times_required: bool = True) -> list[Impression]:
    impressions: list[Impression] = []
    for number, fields in _tsv_rows(path):
        if len(fields) != _BEHAVIOR_COLUMNS:
            problem = f"expected {_BEHAVIOR_COLUMNS} tab-separated columns, got {len(fields)}"
            raise DataFormatError(path, number, problem)
        impression_id, user_id, raw_time, history, shown = fields
        if not impression_id.strip() or not user_id.strip():
            raise DataFormatError(path, number, "empty impression id or user id")
        time = _parse_time(raw_time)
        if time is None and (times_required or raw_time.strip()):
            why = "" if raw_time.strip() else " (times may be left out only when split.json names the split)"
            raise DataFormatError(path, number, f"bad time {raw_time!r}; expected like '11/12/2019 2:14:46 PM'{why}")
        nids, labels = _parse_candidates(path, number, shown)
        impressions.append(
            Impression(
                impression_id=impression_id.strip(),
                user_id=user_id.strip(),
                time=time,
                history=_lookup(path, number, catalog.index, history.split()),
                candidates=_lookup(path, number, catalog.index, nids),
                labels=labels,
            )
        )
    if not impressions:
        raise DataFormatError(path, None, "empty file (no impressions)")
    return impressions


def load_mind(folder: str | Path, use_abstract: bool = False, times_required: bool = True) -> MindDataset:
    """Load MIND news.tsv and behaviors.tsv; item text is the title (plus abstract if asked and present).

    times_required=False accepts empty time fields (a split file then decides the split)."""
    folder = Path(folder)
    catalog = _load_news(folder / NEWS_FILE, use_abstract)
    return MindDataset(catalog, _load_behaviors(folder / BEHAVIORS_FILE, catalog, times_required))


def split_mind(dataset: MindDataset) -> MindSplits:
    """Test = last calendar day present, val = the previous day present, train = everything earlier."""
    days: list[date] = sorted({imp.time.date() for imp in dataset.impressions if imp.time is not None})
    if len(days) < 3:
        raise ValueError(f"need impressions on at least 3 distinct days for a time split, found {len(days)}")
    test_day, val_day = days[-1], days[-2]
    splits = MindSplits([], [], [])
    for impression in dataset.impressions:
        day = impression.time.date() if impression.time is not None else None
        target = splits.test if day == test_day else splits.val if day == val_day else splits.train
        target.append(impression)
    return splits


def split_mind_by_ids(
    dataset: MindDataset, val: frozenset[str], test: frozenset[str], folder: str | Path = "."
) -> MindSplits:
    """The split named by a split file: listed impression ids go to val / test, all others train."""
    splits = MindSplits([], [], [])
    for impression in dataset.impressions:
        key = impression.impression_id
        (splits.test if key in test else splits.val if key in val else splits.train).append(impression)
    if not splits.train and not is_evaluation_only():
        raise no_training_part(folder, "impressions")
    return splits
