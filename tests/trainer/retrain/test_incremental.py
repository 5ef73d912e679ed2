"""Incremental retrains: what the snapshot keeps (new log, context, carried gate units, seeded bounded replay), the
warm start from the active version's exported table (only new or changed items encoded), and the job records that
say what each retrain trained on, chained from one version to the next; full mode on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gramrec.service.schemas import Job
from gramrec.trainer.explicit_settings import explicit_train_settings
from gramrec.trainer.known_rows import KnownRows
from gramrec.trainer.retrain.increment import Increment, is_after, select_kt, select_nr
from gramrec.trainer.retrain.worker import TrainerWorker
from gramrec.trainer.train import build_run
from tests.helpers.retrain_data import deploy_first_version, write_kt_data

NOW = "2026-11-23T10:00:00+00:00"


# -- selection --------------------------------------------------------------------------------------------------------
def kt_rows() -> tuple[list[str], list[str | None]]:
    """Ten base students of six answers, then the log: 'old' answered before id 5-0, 's3' and 'new' after it."""
    users = [f"s{u}" for u in range(10) for _ in range(6)]
    ids: list[str | None] = [None] * len(users)
    logged = [("old", "1-0"), ("old", "2-0"), ("s3", "5-0"), ("s3", "6-0"), ("new", "6-1"), ("s3", "10-0")]
    return users + [u for u, _ in logged], ids + [i for _, i in logged]


def test_entry_ids_order_as_numbers_not_strings():
    assert is_after("10-0", "9-5") and is_after("9-10", "9-9") and not is_after("9-5", "9-5")
    assert is_after("12", "3") and is_after("1-0", None) and not is_after(None, None)


def test_kt_keeps_the_new_answers_their_context_and_a_bounded_seeded_replay():
    users, ids = kt_rows()
    increment = Increment(after="5-0", replay_ratio=1.0, replay_max=3, context_answers=2, seed="a")
    selection = select_kt(users, ids, increment)
    kept = [(users[i], ids[i]) for i in selection.keep]
    assert selection.keep == sorted(selection.keep)  # global order kept
    # s3's answers since 5-0, preceded by two older ones (its answer 5-0 itself and its last base answer)
    assert [i for u, i in kept if u == "s3"] == [None, "5-0", "6-0", "10-0"]
    assert [i for u, i in kept if u == "new"] == ["6-1"]
    replayed = {u for u, _ in kept} - {"s3", "new"}
    assert len(replayed) == 2  # replay_ratio 1 per new student
    assert all(sum(u == r for u, _ in kept) == 2 for r in replayed)  # their last `context_answers` answers
    assert selection.counts == {
        "new_units": 2, "new_interactions": 3, "carried_units": 0, "replay_units": 2, "replay_interactions": 4,
        "context_interactions": 2,
    }
    assert select_kt(users, ids, increment).keep == selection.keep  # seeded
    others = {frozenset(u for u in (users[i] for i in select_kt(users, ids, Increment(
        after="5-0", context_answers=2, seed=seed)).keep)) for seed in "bcdefg"}
    assert len(others) > 1  # another seed, another sample
    capped = select_kt(users, ids, Increment(after="5-0", replay_ratio=50, replay_max=3, seed="a"))
    assert capped.counts["replay_units"] == 3
    floor = select_kt(users, ids, Increment(after="5-0", replay_ratio=0, replay_min=5, seed="a"))
    assert floor.counts["replay_units"] == 5


def test_kt_trains_on_last_times_held_out_students():
    users, ids = kt_rows()
    selection = select_kt(users, ids, Increment(after="10-0", carried=frozenset({"s7"}), replay_ratio=0, seed=0))
    assert {users[i] for i in selection.keep} == {"s7"} and len(selection.keep) == 6
    assert selection.counts["new_units"] == 0 and selection.counts["carried_units"] == 1


def test_nr_keeps_impressions_logged_since_carried_ones_and_a_replay():
    units = [f"b{i}" for i in range(20)] + ["L1-0", "L2-0", "L3-0", "L4-0"]
    ids = [None] * 20 + ["1-0", "2-0", "3-0", "4-0"]
    increment = Increment(after="2-0", carried=frozenset({"L2-0"}), replay_ratio=2, seed=1)
    selection = select_nr(units, ids, increment)
    kept = [units[i] for i in selection.keep]
    assert {"L3-0", "L4-0", "L2-0"} <= set(kept) and len(kept) == 3 + 4
    assert selection.counts == {
        "new_units": 2, "new_interactions": 2, "carried_units": 1, "replay_units": 4, "replay_interactions": 4,
    }
    everything = select_nr(units, ids, Increment(after=None, replay_ratio=0))
    assert [units[i] for i in everything.keep] == units[20:]  # a version that saw only base data: all the log is new


# -- the starting table -----------------------------------------------------------------------------------------------
def test_gram_starts_from_known_rows_and_encodes_only_new_or_changed_items(tmp_path, tiny_encoder_dir):
    data = write_kt_data(tmp_path / "kt", items=12)
    settings = explicit_train_settings(
        task="kt", data=data, strategy="gram", period="1e", encoder_dir=tiny_encoder_dir, hidden_dim=16,
        max_tokens=16, out=tmp_path / "run", progress=False,
    )
    cold = build_run(settings)
    assert cold.encoder.items_forward == 12
    rows = cold.strategy.encoded.numpy().copy()
    ids, texts = list(cold.task.items.ids), list(cold.task.items.texts)
    rows[3] = 99.0  # an item whose text changed since: its stale row must not be used
    texts[3] = "an older text"
    known = KnownRows(ids[1:], texts[1:], rows[1:])  # item 0 is new
    warm = build_run(settings, known_rows=known)
    assert warm.encoder.items_forward == 2  # item 0 (new) and item 3 (changed)
    np.testing.assert_allclose(warm.strategy.encoded.numpy(), cold.strategy.encoded.numpy(), atol=1e-6)
    other_encoder = KnownRows(ids, list(cold.task.items.texts), np.zeros((12, 7), np.float32))
    assert build_run(settings, known_rows=other_encoder).encoder.items_forward == 12


# -- jobs -------------------------------------------------------------------------------------------------------------
def mixed(user: str, n: int, first_item: int = 1) -> list[dict]:
    """n answers, right and wrong in turn, so every held-out slice has both classes."""
    return [
        {"user_id": user, "item_id": f"q{first_item + k % 3}", "correct": str(k % 2), "timestamp": NOW}
        for k in range(n)
    ]


@pytest.fixture
def small_replay(settings_for, tmp_path, tiny_training_env):
    retrain = {"tasks": ["kt"], "epochs": 1, "lease_ttl_s": 5, "gate_tolerance": 1.0, "replay_min": 0,
               "replay_ratio": 2.0, "gate_fraction": 0.2}
    settings = settings_for("redis", tasks=["kt"], bootstrap_kt_data=write_kt_data(tmp_path / "base"), retrain=retrain)
    first = deploy_first_version(settings)
    from gramrec.service.store import open_store

    store = open_store(settings)
    yield settings, store, first
    store.close()


def run(settings, store, params: dict | None = None) -> dict:
    store.enqueue_job(Job.queued("kt", "admin", params or {}))
    job = TrainerWorker(settings, store).work_once()
    assert job is not None and job["status"] == "succeeded", (job or {}).get("error")
    return job


def trained_on(settings, version: str) -> dict:
    return json.loads((Path(settings.artifacts_dir) / "checkpoints" / version / "trained_on.json").read_text())


def test_incremental_jobs_chain_what_they_trained_on(small_replay):
    settings, store, first = small_replay
    vector = np.ones((2, 32), np.float32)
    store.put_items("kt", first, ["fresh", "q2"], ["A new question about queues", "A changed question"], vector, 32)
    ids = store.log_interactions("kt", mixed("n1", 6) + mixed("n2", 6))

    job = run(settings, store)
    data = job["data"]
    assert data["mode"] == data["requested_mode"] == "incremental" and job["params"] == {}
    assert data["increment"] == {
        "after": None, "through": ids[-1], "new_units": 2, "new_interactions": 12, "carried_units": 0,
        "replay_units": 4, "replay_interactions": data["increment"]["replay_interactions"],
        "context_interactions": 0,
    }
    assert data["increment"]["replay_interactions"] == 4 * 15  # the base's students answered 15 times each
    assert data["items_encoded_at_start"] == 2  # 'fresh' and the changed q2; the 15 others came from the table
    assert data["train"]["steps"] > 0 and data["train"]["interactions_per_epoch"] > 0
    record = trained_on(settings, job["version"])
    assert record["last_logged_id"] == ids[-1] and record["mode"] == "incremental"
    assert len(record["gate_units"]) == 1  # 20% of 6 students

    more = store.log_interactions("kt", mixed("n3", 5))
    second = run(settings, store)
    increment = second["data"]["increment"]
    assert increment["after"] == ids[-1] and increment["through"] == more[-1]
    assert (increment["new_units"], increment["new_interactions"], increment["carried_units"]) == (1, 5, 1)
    assert second["data"]["items_encoded_at_start"] == 0  # nothing changed since the version it starts from

    full = run(settings, store, {"mode": "full"})
    assert full["data"]["mode"] == "full" and "increment" not in full["data"]
    assert full["data"]["logged_interactions"] == 17 and full["data"]["items_encoded_at_start"] == 17
    assert trained_on(settings, full["version"])["last_logged_id"] == more[-1]


def test_without_a_checkpoint_an_incremental_request_runs_full(small_replay):
    settings, store, first = small_replay
    import shutil

    for path in (Path(settings.artifacts_dir) / "checkpoints").iterdir():
        shutil.rmtree(path)
    store.log_interactions("kt", mixed("n1", 6))
    job = run(settings, store, {"mode": "incremental"})
    assert job["data"]["mode"] == "full" and "no checkpoint" in job["data"]["fallback"]


@pytest.mark.parametrize("content", ["{not json", '{"last_logged_id": "12; DROP", "gate_units": []}',
                                     '{"last_logged_id": "5-0", "gate_units": "u1"}', "[1, 2]"])
def test_a_damaged_trained_on_record_makes_a_full_retrain_that_says_why(small_replay, content):
    settings, store, _ = small_replay
    store.log_interactions("kt", mixed("n1", 6) + mixed("n2", 6))
    first = run(settings, store)
    (Path(settings.artifacts_dir) / "checkpoints" / first["version"] / "trained_on.json").write_text(content)
    store.log_interactions("kt", mixed("n3", 6))
    job = run(settings, store)
    assert job["data"]["mode"] == "full" and "trained_on.json" in job["data"]["fallback"]
