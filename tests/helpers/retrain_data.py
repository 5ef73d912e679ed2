"""Small generated data sets and a deployed tiny model, shared by the retraining tests."""

from __future__ import annotations

import csv
import random
from datetime import datetime, timedelta
from pathlib import Path

from gramrec.service.settings import ServiceSettings, Task

TOPICS = ["loops", "arrays", "strings", "recursion", "sorting", "maps", "classes", "math"]


def write_kt_data(folder: Path, items: int = 16, users: int = 40, answers: int = 15, seed: int = 0) -> Path:
    """Generic KT tables; a student's chance of success depends on skill and topic, so there is signal to learn."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "text"])
        writer.writerows((f"q{i}", f"Write a Java method about {TOPICS[i % 8]} for exercise {i}.") for i in range(items))
    with open(folder / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "correct", "order"])
        order = 0
        for user in range(users):
            skill = rng.random()
            for _ in range(answers):
                item = rng.randrange(items)
                writer.writerow([f"u{user}", f"q{item}", int(rng.random() < 0.2 + skill * (item % 8) / 8), order])
                order += 1
    return folder


def write_mind_data(folder: Path, news: int = 20, impressions: int = 60, seed: int = 0) -> Path:
    """A MIND-layout folder: news.tsv and behaviors.tsv over four days."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"N{i}" for i in range(news)]
    with open(folder / "news.tsv", "w") as f:
        for i, nid in enumerate(ids):
            f.write(f"{nid}\tnews\t{TOPICS[i % 8]}\tHeadline {i} about {TOPICS[i % 8]} today\tAn abstract\t\t\t\n")
    start = datetime(2019, 11, 10, 9, 0, 0)
    with open(folder / "behaviors.tsv", "w") as f:
        for n in range(impressions):
            moment = start + timedelta(hours=n * 96 / impressions)
            history = " ".join(rng.sample(ids, 3))
            shown = rng.sample(ids, 5)
            tokens = " ".join(f"{nid}-{int(k == 0)}" for k, nid in enumerate(shown))
            f.write(f"{n + 1}\tU{n % 7}\t{moment.strftime('%m/%d/%Y %I:%M:%S %p')}\t{history}\t{tokens}\n")
    return folder


def deploy_first_version(settings: ServiceSettings, task: Task = "kt") -> str:
    """Trains and exports the first model on the base data and activates it."""
    from gramrec.trainer.bootstrap import train_export_and_activate

    return train_export_and_activate(settings, task)
