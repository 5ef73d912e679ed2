"""Real data cut into a base set and a stream of chunks, for the replay and freshness benchmarks.

kt: CodeWorkout rows ordered by assignment (then file order, which is each student's answer order), cut into
`chunks + 1` slices of equal size; the first slice is the base data set. nr: the MIND subset by day; the first day
(11/9) is the base, each later day a chunk, at most `per_day` impressions a day (the first ones of the day). The
nr catalog is the news these impressions show or name in a history (the rest of the 51k would only add encoding
time); it is all in the base catalog, as if every article had come through POST /items before it was shown.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

MIND_TIME = "%m/%d/%Y %I:%M:%S %p"


@dataclass
class KTRow:
    user: str
    item: str
    correct: int


@dataclass
class Impression:
    impression_id: str
    user: str
    time: datetime
    history: list[str]
    shown: list[tuple[str, int]]


def kt_slices(codeworkout: Path, chunks: int) -> tuple[dict[str, str], list[list[KTRow]]]:
    """(item texts, [base, chunk 1, ..., chunk n])."""
    with open(codeworkout / "problems.csv", newline="", encoding="utf-8") as f:
        texts = {row["ProblemID"]: row["Requirement"] for row in csv.DictReader(f)}
    with open(codeworkout / "interactions_merged.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    order = sorted(range(len(rows)), key=lambda i: (int(rows[i]["AssignmentID"]), i))
    ordered = [KTRow(rows[i]["SubjectID"], rows[i]["ProblemID"], int(rows[i]["FirstAttemptCorrect"])) for i in order]
    size = -(-len(ordered) // (chunks + 1))
    return texts, [ordered[k * size : (k + 1) * size] for k in range(chunks + 1)]


def write_kt_base(folder: Path, texts: dict[str, str], rows: list[KTRow]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "text"])
        writer.writerows((item, " ".join(text.split())) for item, text in texts.items())
    with open(folder / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "correct", "order"])
        writer.writerows((row.user, row.item, row.correct, i) for i, row in enumerate(rows))
    return folder


def mind_days(mind: Path, per_day: int, days: int) -> tuple[dict[str, tuple[str, str, str]], list[list[Impression]]]:
    """(news id -> (category, subcategory, title) of the news used, [base day, day 2, ...])."""
    by_day: dict[str, list[Impression]] = {}
    with open(mind / "behaviors.tsv", encoding="utf-8") as f:
        for line in f:
            impression_id, user, moment, history, shown = line.rstrip("\n").split("\t")
            when = datetime.strptime(moment, MIND_TIME)
            pairs = [(token.rsplit("-", 1)[0], int(token.rsplit("-", 1)[1])) for token in shown.split()]
            by_day.setdefault(when.strftime("%m/%d"), []).append(
                Impression(impression_id, user, when, history.split(), pairs)
            )
    slices = [sorted(by_day[day], key=lambda imp: imp.time)[:per_day] for day in sorted(by_day)[: days + 1]]
    used = {nid for day in slices for imp in day for nid in [*imp.history, *(n for n, _ in imp.shown)]}
    news: dict[str, tuple[str, str, str]] = {}
    with open(mind / "news.tsv", encoding="utf-8") as f:
        for line in f:
            nid, category, subcategory, title, *_ = line.rstrip("\n").split("\t")
            if nid in used:
                news[nid] = (category, subcategory, title)
    return news, slices


def write_mind_base(folder: Path, news: dict[str, tuple[str, str, str]], day: list[Impression]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "news.tsv", "w", encoding="utf-8") as f:
        for nid, (category, subcategory, title) in news.items():
            f.write(f"{nid}\t{category}\t{subcategory}\t{title}\t\t\t\t\n")
    with open(folder / "behaviors.tsv", "w", encoding="utf-8") as f:
        for imp in day:
            shown = " ".join(f"{nid}-{label}" for nid, label in imp.shown)
            f.write(
                f"{imp.impression_id}\t{imp.user}\t{imp.time.strftime(MIND_TIME)}\t{' '.join(imp.history)}\t{shown}\n"
            )
    return folder


def kt_timestamp(start: datetime, index: int) -> str:
    """CodeWorkout has no times: the k-th streamed answer is logged k seconds after `start`."""
    return (start + timedelta(seconds=index)).isoformat()
