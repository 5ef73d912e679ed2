"""A retrain's training data: the base dataset plus every interaction logged since, frozen into one folder.

The folder is in the task's ordinary on-disk format (KT: items.csv + interactions.csv; news: MIND's news.tsv +
behaviors.tsv) plus a split.json, so the ordinary training code reads it and `gramrec train --data` can replay
any retrain. The split holds out the most recent users (kt) or impressions (nr): the gate's slice, on which the
new and the active model are both scored, and the slice before it for early stopping.

Items are the base catalog with the texts added or updated through the API laid over it. Logged interactions
that name an item nobody gave a text for cannot be trained on; they are counted as dropped, not silently lost.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gramrec.service.store import Store
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.kt_data import load_kt_data
from gramrec.trainer.mind_data import BEHAVIORS_FILE, NEWS_FILE, load_mind
from gramrec.trainer.retrain.increment import Increment, select_kt, select_nr
from gramrec.trainer.retrain.interaction_segments import SegmentError, entry_key, list_segments, read_segment
from gramrec.trainer.split_file import write_split

log = logging.getLogger("gramrec.retrain")

STREAM_PAGE = 10_000  # logged entries per store round trip
_MIND_TIME = "%m/%d/%Y %I:%M:%S %p"


@dataclass
class Snapshot:
    folder: Path
    task: str
    texts: dict[str, str]  # item id -> the text trained on (new tables are checked against it after the flip)
    base_interactions: int = 0
    logged_interactions: int = 0
    dropped_interactions: int = 0
    last_logged_id: str | None = None
    gate_units: list[str] = field(default_factory=list)  # users (kt) or impression ids (nr) of the gate slice
    mode: str = "full"
    increment: dict = field(default_factory=dict)  # incremental mode: after which id, and new/replay counts

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "items": len(self.texts),
            "base_interactions": self.base_interactions,
            "logged_interactions": self.logged_interactions,
            "dropped_interactions": self.dropped_interactions,
            "last_logged_id": self.last_logged_id,
            "gate_units": len(self.gate_units),
        } | ({"increment": self.increment} if self.mode == "incremental" else {})

    def select(self, selection_counts: dict, increment: Increment) -> None:
        self.mode = "incremental"
        self.increment = {"after": increment.after, "through": self.last_logged_id} | selection_counts


def build_snapshot(
    task: str,
    base_data: Path,
    store: Store,
    folder: Path,
    gate_fraction: float,
    use_abstract: bool = False,
    increment: Increment | None = None,
) -> Snapshot:
    """All history (full mode), or with `increment` only what an incremental retrain trains on (increment.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    if task == "kt":
        snapshot = _kt_snapshot(Path(base_data), store, folder, gate_fraction, increment)
    else:
        snapshot = _nr_snapshot(Path(base_data), store, folder, gate_fraction, use_abstract, increment)
    log.info("snapshot", extra={"task": task, "folder": str(folder)} | snapshot.summary())
    return snapshot


def logged_entries(store: Store, task: str, after: str | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """Every logged entry of the task with an id after `after` (all when None), oldest first, each once: the
    compacted segments (trainer/retrain/interaction_segments.py), then the store's live tail after the last
    segment. Ids compare with interaction_segments.entry_key (Redis `ms-seq`, sqlite integers)."""
    directory = store.log_segments_dir()
    segments = []
    if directory is not None:
        folder = Path(directory) / task
        if not Path(directory).is_dir():
            raise SegmentError(f"the interaction log's segments folder {directory} is missing (the store names it)")
        segments = list_segments(folder)
        checked = store.id_floor(task)  # read after the listing: it is recorded before a segment is written
        if segments and (checked is None or entry_key(checked) < entry_key(segments[-1].last)):
            raise SegmentError(
                f"the store's {task} interaction ids are not yet checked against the compacted log (through "
                f"{segments[-1].last}): the store was replaced or restored, and may have reissued compacted ids; "
                "the trainer's next compaction moves such entries past the log"
            )
    floor = entry_key(after) if after is not None else None
    for segment in segments:
        if floor is not None and entry_key(segment.last) <= floor:
            continue
        for entry_id, fields in read_segment(segment):
            if floor is None or entry_key(entry_id) > floor:
                yield entry_id, fields
    if segments and (floor is None or entry_key(segments[-1].last) > floor):
        after = segments[-1].last
    while page := store.read_interactions(task, count=STREAM_PAGE, after=after):
        yield from page
        after = page[-1][0]


def merged_catalog(base: ItemCatalog, api_texts: dict[str, str]) -> dict[str, str]:
    """Base items with API texts laid over them (updated texts win); blank texts cannot be trained on."""
    texts = dict(zip(base.ids, base.texts, strict=True)) | api_texts
    return {item_id: text for item_id, text in texts.items() if text.strip()}


def recent_split(units_by_recency: list[str], gate_fraction: float) -> tuple[list[str], list[str]]:
    """(val, test): the most recent `gate_fraction` of units is the gate's test slice, the slice before it val."""
    n = max(1, round(gate_fraction * len(units_by_recency)))
    if len(units_by_recency) < 2 * n + 1:
        raise ValueError(f"too little data for a held-out slice: {len(units_by_recency)} users or impressions")
    newest = units_by_recency[::-1]
    return newest[n : 2 * n], newest[:n]


# -- knowledge tracing ---------------------------------------------------------------------------------------------
def _kt_snapshot(
    base_data: Path, store: Store, folder: Path, gate_fraction: float, increment: Increment | None
) -> Snapshot:
    base = load_kt_data(base_data)
    texts = merged_catalog(base.items, store.texts("kt"))
    snapshot = Snapshot(folder, "kt", texts)
    # (user, item, correct): the base first (it predates the log), then the logged answers by answer time
    rows: list[tuple[str, str, int]] = []
    for sequence in base.sequences:
        for item, correct in zip(sequence.items, sequence.correct, strict=True):
            rows.append((sequence.user_id, base.items.ids[item], int(correct)))
    snapshot.base_interactions = len(rows)
    logged: list[tuple[float, str, str, int, str]] = []  # (answered at, user, item, correct, entry id), arrival order
    answered_at = -math.inf
    for entry_id, fields in logged_entries(store, "kt"):
        snapshot.last_logged_id = entry_id
        if fields.get("item_id") not in texts or fields.get("correct") not in ("0", "1"):
            snapshot.dropped_interactions += 1
            continue
        answered_at = _answer_time(fields.get("timestamp"), answered_at)
        logged.append((answered_at, fields["user_id"], fields["item_id"], int(fields["correct"]), entry_id))
        snapshot.logged_interactions += 1
    logged.sort(key=lambda row: row[0])  # stable: ties keep their arrival order
    rows += [(user, item, correct) for _, user, item, correct, _ in logged]
    entry_ids: list[str | None] = [None] * snapshot.base_interactions  # each row's logged entry id (None: base data)
    entry_ids += [entry_id for *_, entry_id in logged]
    if increment is not None:
        selection = select_kt([row[0] for row in rows], entry_ids, increment)
        rows = [rows[i] for i in selection.keep]
        snapshot.select(selection.counts, increment)

    with open(folder / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "text"])
        writer.writerows((item_id, _one_line(text)) for item_id, text in texts.items())
    with open(folder / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "correct", "order"])
        writer.writerows((user, item, correct, order) for order, (user, item, correct) in enumerate(rows))

    last_seen = {user: order for order, (user, _, _) in enumerate(rows)}  # position in time: recency
    users_by_recency = sorted(last_seen, key=last_seen.__getitem__)
    val, test = recent_split(users_by_recency, gate_fraction)
    write_split(folder, val, test)
    snapshot.gate_units = test
    return snapshot


def _answer_time(timestamp: str | None, previous: float) -> float:
    """When a logged answer was given (Unix seconds), so backfilled answers take their place in time rather than
    at the end. An entry without a readable time keeps its arrival position: it takes the time of the one before."""
    if not timestamp:
        return previous
    try:
        return float(timestamp)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return previous
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# -- news ------------------------------------------------------------------------------------------------------------
def _nr_snapshot(
    base_data: Path, store: Store, folder: Path, gate_fraction: float, use_abstract: bool, increment: Increment | None
) -> Snapshot:
    base = load_mind(base_data, use_abstract=use_abstract)
    texts = merged_catalog(base.items, store.texts("nr"))
    snapshot = Snapshot(folder, "nr", texts)
    behaviors: list[tuple[datetime, str, str, list[str], list[str]]] = []  # (time, id, user, history, shown)
    ids = base.items.ids
    for imp in base.impressions:
        shown = [f"{ids[c]}-{label}" for c, label in zip(imp.candidates, imp.labels, strict=True)]
        assert imp.time is not None  # base data is read with times required (load_mind's default)
        behaviors.append((imp.time, f"b{imp.impression_id}", imp.user_id, [ids[h] for h in imp.history], shown))
    snapshot.base_interactions = len(behaviors)
    for entry_id, fields in logged_entries(store, "nr"):
        snapshot.last_logged_id = entry_id
        impression = _logged_impression(entry_id, fields, texts)
        if impression is None:
            snapshot.dropped_interactions += 1
            continue
        behaviors.append(impression)
        snapshot.logged_interactions += 1
    if increment is not None:
        entry_ids = [unit[1][1:] if unit[1].startswith("L") else None for unit in behaviors]  # L<entry id>: logged
        selection = select_nr([unit[1] for unit in behaviors], entry_ids, increment)
        behaviors = [behaviors[i] for i in selection.keep]
        snapshot.select(selection.counts, increment)

    with open(folder / NEWS_FILE, "w", encoding="utf-8") as f:
        meta = dict(zip(ids, base.items.metadata or [{}] * len(ids), strict=True))  # the base catalog's categories
        for item_id, text in texts.items():
            m = meta.get(item_id, {})
            f.write(f"{item_id}\t{m.get('category', '')}\t{m.get('subcategory', '')}\t{_one_line(text)}\n")
    order = sorted(range(len(behaviors)), key=lambda i: (behaviors[i][0], i))  # stable: the log after the base
    with open(folder / BEHAVIORS_FILE, "w", encoding="utf-8") as f:
        for i in order:
            moment, impression_id, user, history, shown = behaviors[i]
            f.write(f"{impression_id}\t{user}\t{moment.strftime(_MIND_TIME)}\t{' '.join(history)}\t{' '.join(shown)}\n")
    val, test = recent_split([behaviors[i][1] for i in order], gate_fraction)
    write_split(folder, val, test)
    snapshot.gate_units = test
    return snapshot


def _logged_impression(entry_id: str, fields: dict[str, str], texts: dict[str, str]):
    """A logged impression in MIND's terms, unknown news left out; None when nothing usable is left."""
    try:
        moment = datetime.fromisoformat(fields["timestamp"]).astimezone(UTC).replace(tzinfo=None)
        history = [nid for nid in fields.get("history", "").split() if nid in texts]
        shown = [token for token in fields["impressions"].split() if token.rpartition("-")[0] in texts]
    except (KeyError, ValueError):
        return None
    if not shown or not fields.get("user_id"):
        return None
    return moment, f"L{entry_id}", fields["user_id"], history, shown


def _one_line(text: str) -> str:
    """Tabs and line breaks would break TSV rows; inside a text they mean the same as a space."""
    return " ".join(text.split())
