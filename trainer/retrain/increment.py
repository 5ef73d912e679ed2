"""What an incremental retrain trains on: the interactions logged since the active version's snapshot, plus a
bounded, seeded replay sample of older history.

Units are what the gate holds out: students (kt) and impressions (nr).
- new units: impressions logged after the active version's last trained entry, or students who answered since;
- carried units: the active version's own gate slice, held out from its training, trained on now;
- replay: a seeded sample of the other units (base data and older log): `replay_ratio` per new unit, at least
  `replay_min` (a gate slice big enough to judge), at most `replay_max`.
A kt student keeps the answers since, preceded by at most `context_answers` older ones (the model reads a student's
history; it need not relearn all of it), so a retrain's size follows the new data, not all history.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from gramrec.trainer.retrain.interaction_segments import entry_key


@dataclass(frozen=True)
class Increment:
    after: str | None  # last logged entry id the active version trained on (None: none; it saw only base data)
    carried: frozenset[str] = frozenset()
    replay_ratio: float = 1.0
    replay_min: int = 0
    replay_max: int = 10_000
    context_answers: int = 100
    seed: int | str = 0  # random.Random seeds from a string reproducibly


@dataclass
class Selection:
    """Which rows (kt answers or nr impressions, by position) an incremental snapshot keeps, and its counts."""

    keep: list[int]
    counts: dict = field(default_factory=dict)


def is_after(entry_id: str | None, after: str | None) -> bool:
    """Whether a logged entry (None: a base-data row) is newer than `after`."""
    if entry_id is None:
        return False
    return after is None or entry_key(entry_id) > entry_key(after)


def replay_sample(candidates: Sequence[str], new_units: int, increment: Increment) -> list[str]:
    wanted = max(increment.replay_min, math.ceil(increment.replay_ratio * new_units))
    wanted = min(increment.replay_max, wanted, len(candidates))
    return random.Random(increment.seed).sample(list(candidates), wanted)


def select_kt(users: Sequence[str], entry_ids: Sequence[str | None], increment: Increment) -> Selection:
    """Rows of students who answered since (or were held out last time), and of a replay sample of the others."""
    by_user: dict[str, list[int]] = {}
    first_new: dict[str, int] = {}  # position, within the student's own rows, of their first new answer
    new_rows = 0
    for row, (user, entry_id) in enumerate(zip(users, entry_ids, strict=True)):
        own = by_user.setdefault(user, [])
        if is_after(entry_id, increment.after):
            first_new.setdefault(user, len(own))
            new_rows += 1
        own.append(row)
    carried = [u for u in by_user if u in increment.carried and u not in first_new]
    replay = replay_sample(
        [u for u in by_user if u not in first_new and u not in increment.carried], len(first_new), increment
    )
    keep: list[int] = []
    for user in [*first_new, *carried, *replay]:
        own = by_user[user]
        start = first_new.get(user, len(own))
        keep.extend(own[max(0, start - increment.context_answers) :])
    keep.sort()
    replay_rows = sum(min(len(by_user[u]), increment.context_answers) for u in replay)
    counts = {
        "new_units": len(first_new),
        "new_interactions": new_rows,
        "carried_units": len(carried),
        "replay_units": len(replay),
        "replay_interactions": replay_rows,
        "context_interactions": len(keep) - new_rows - replay_rows,
    }
    return Selection(keep, counts)


def select_nr(units: Sequence[str], entry_ids: Sequence[str | None], increment: Increment) -> Selection:
    """Impressions logged since (or held out last time), and a replay sample of the older ones."""
    new = [i for i, entry_id in enumerate(entry_ids) if is_after(entry_id, increment.after)]
    fresh = set(new)
    carried = [i for i, unit in enumerate(units) if unit in increment.carried and i not in fresh]
    taken = fresh | set(carried)
    older = [str(i) for i in range(len(units)) if i not in taken]
    replay = [int(i) for i in replay_sample(older, len(new), increment)]
    counts = {
        "new_units": len(new),
        "new_interactions": len(new),
        "carried_units": len(carried),
        "replay_units": len(replay),
        "replay_interactions": len(replay),
    }
    return Selection(sorted([*new, *carried, *replay]), counts)
