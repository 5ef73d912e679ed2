"""The retrain loop in one process: snapshot, job outcomes (promote, gate rejection, crash), the lease, ticks,
catch-up of items added during a job, retention, and hot swap in API registries. Real Redis (and sqlite where the
behaviour is the store's); processes are exercised in test_retrain_e2e.py."""

from __future__ import annotations

import csv
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from gramrec.service.artifact import list_versions
from gramrec.service.bundle import ModelBundle
from gramrec.service.registry import ModelRegistry
from gramrec.service.schemas import Job
from gramrec.service.store import LeaseLost, open_store
from gramrec.trainer.retrain.snapshot import build_snapshot
from gramrec.trainer.retrain.worker import TrainerWorker, latest_fire_time, make_trigger
from gramrec.trainer.split_file import read_split
from tests.helpers.fakes import REDIS_URL
from tests.helpers.retrain_data import deploy_first_version, write_kt_data, write_mind_data

NOW = "2026-11-23T10:00:00+00:00"


def answers(user: str, item: str = "q1", n: int = 5, correct: str = "1") -> list[dict]:
    return [{"user_id": user, "item_id": item, "correct": correct, "timestamp": NOW}] * n


@pytest.fixture
def kt_base(tmp_path) -> Path:
    return write_kt_data(tmp_path / "kt-base")


@pytest.fixture
def deployed(settings_for, kt_base, tiny_training_env, request):
    """(settings, store, first version) of a kt deployment on the parametrized backend, or Redis by default."""
    backend = getattr(request, "param", "redis")
    overrides = request.node.get_closest_marker("retrain")
    # The gate's own tests set a tolerance; elsewhere it always promotes: on these 40 generated students the gate
    # slice is 60 answers, whose AUC moves by more than the default tolerance from one epoch of fine-tuning alone.
    retrain = {"tasks": ["kt"], "epochs": 1, "lease_ttl_s": 5, "gate_tolerance": 1.0} | (
        overrides.kwargs if overrides else {})
    settings = settings_for(backend, tasks=["kt"], bootstrap_kt_data=kt_base, retrain=retrain)
    version = deploy_first_version(settings)
    store = open_store(settings)
    yield settings, store, version
    store.close()


def run_one(settings, store, params: dict | None = None) -> dict:
    job = store.enqueue_job(Job.queued("kt", "admin", params or {}))
    finished = TrainerWorker(settings, store).work_once()
    assert finished is not None and finished["id"] == job["id"]
    assert store.get_job(job["id"]) == finished
    return finished


# -- snapshot ---------------------------------------------------------------------------------------------------------
def test_kt_snapshot_merges_base_log_and_api_items(settings_for, kt_base, tmp_path):
    store = open_store(settings_for("redis"))
    store.compare_and_set_active("kt", None, "kt-v1")
    store.put_items("kt", "kt-v1", ["fresh"], ["A brand new question about queues"], np.ones((1, 4)), 4)
    store.log_interactions("kt", answers("late1", "fresh", 3) + answers("late2", "q2", 4) + answers("x", "ghost", 2))
    snapshot = build_snapshot("kt", kt_base, store, tmp_path / "snap", gate_fraction=0.05)

    assert snapshot.summary() | {"last_logged_id": None} == {
        "mode": "full", "items": 17, "base_interactions": 600, "logged_interactions": 7, "dropped_interactions": 2,
        "last_logged_id": None, "gate_units": 2,
    }
    assert snapshot.texts["fresh"] == "A brand new question about queues"
    with open(tmp_path / "snap" / "interactions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 607 and rows[-1]["user_id"] == "late2" and rows[-1]["order"] == "606"
    split = read_split(tmp_path / "snap")
    assert split.test == {"late1", "late2"}  # the most recent users are the gate's slice
    assert len(split.val) == 2 and not split.val & split.test

    from gramrec.trainer.kt_task import KnowledgeTracingTask
    from gramrec.trainer.settings import TrainSettings

    task = KnowledgeTracingTask(TrainSettings(task="kt", data=tmp_path / "snap"))
    assert sorted(s.user_id for s in task.splits.test) == ["late1", "late2"]
    assert len(task.splits.train) == 38  # 40 base + late1 + late2, less 2 val and 2 test users
    store.close()


def test_news_snapshot_keeps_known_news_and_holds_out_the_latest(settings_for, tmp_path):
    store = open_store(settings_for("embedded"))
    base = write_mind_data(tmp_path / "mind")
    store.log_interactions("nr", [
        {"user_id": "R1", "history": "N1 NX N2", "impressions": "N3-1 NX-0 N4-0", "timestamp": NOW},
        {"user_id": "R2", "history": "", "impressions": "NX-1", "timestamp": NOW},  # nothing known: dropped
    ])
    snapshot = build_snapshot("nr", base, store, tmp_path / "snap", gate_fraction=0.05)
    assert (snapshot.logged_interactions, snapshot.dropped_interactions, snapshot.base_interactions) == (1, 1, 60)
    last = (tmp_path / "snap" / "behaviors.tsv").read_text().splitlines()[-1].split("\t")
    assert last[1:] == ["R1", "11/23/2026 10:00:00 AM", "N1 N2", "N3-1 N4-0"]
    assert read_split(tmp_path / "snap").test == {last[0]} | {"b60", "b59"}

    from gramrec.trainer.nr_task import NewsTask
    from gramrec.trainer.settings import TrainSettings

    task = NewsTask(TrainSettings(task="nr", data=tmp_path / "snap"))
    assert {i.impression_id for i in task.splits.test} == {last[0], "b60", "b59"}
    store.close()


def test_snapshot_refuses_data_too_small_to_hold_out(settings_for, tmp_path):
    store = open_store(settings_for("embedded"))
    base = write_kt_data(tmp_path / "kt", users=2)
    with pytest.raises(ValueError, match="too little data"):
        build_snapshot("kt", base, store, tmp_path / "snap", gate_fraction=0.1)
    store.close()


# -- job outcomes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deployed", ["redis", "embedded"], indirect=True)
def test_retrain_promotes_warm_started_model(deployed):
    settings, store, first = deployed
    store.log_interactions("kt", answers("s1") + answers("s2", "q3", correct="0"))
    job = run_one(settings, store)

    assert job["status"] == "succeeded", (job["error"], job["metrics"])
    assert job["base_version"] == first and job["version"] != first
    assert store.active_version("kt") == job["version"]
    assert set(job["timings"]) == {"snapshot", "train", "gate", "export", "table", "activate", "retire"}
    metrics = job["metrics"]
    assert metrics["promoted"] and metrics["new"] >= metrics["active"] - metrics["tolerance"]
    assert job["data"]["logged_interactions"] == 10
    assert store.count_items(job["version"]) == 16
    manifest = next(m for m in list_versions(settings.artifacts_dir) if m["version"] == job["version"])
    assert Path(manifest["source_checkpoint"]) == (settings.artifacts_dir / "checkpoints" / job["version"]).resolve()
    # calibrated on the validation split of the job's data snapshot, read before the work dir goes
    assert manifest["kt_calibration"] == "kt_calibration.json", manifest["kt_calibration_fit"]
    assert not (settings.artifacts_dir / "jobs" / job["id"]).exists()  # the job's work dir is cleaned up
    # The next retrain warm-starts from this version's checkpoint.
    assert run_one(settings, store)["base_version"] == job["version"]


def test_a_retrain_fine_tunes_the_encoder(deployed):
    """GRAM-1E must move the content encoder, not only the head: the items' texts did not change, yet every item's
    vector in the new version differs from the old one by far more than float noise (~1e-7 relative)."""
    settings, store, first = deployed
    store.log_interactions("kt", answers("s1") + answers("s2", "q3", correct="0"))
    job = run_one(settings, store)
    assert job["status"] == "succeeded", job["error"]
    ids = sorted(store.table_ids(first))
    assert ids == sorted(store.table_ids(job["version"]))

    def matrix(version):
        return np.stack([np.frombuffer(row, dtype="<f4") for row in store.get_vectors(version, ids)])

    old, new = matrix(first), matrix(job["version"])
    moved = np.linalg.norm(new - old, axis=1) / np.linalg.norm(old, axis=1)
    assert moved.min() > 1e-4, moved


@pytest.mark.retrain(gate_tolerance=-1.0)  # demand a gain of a full AUC point: never met
def test_gate_rejection_keeps_the_active_model(deployed):
    settings, store, first = deployed
    job = run_one(settings, store)
    assert job["status"] == "rejected" and job["error"] is None
    assert job["metrics"]["promoted"] is False and "export" not in job["timings"]
    assert store.active_version("kt") == first
    assert [m["version"] for m in list_versions(settings.artifacts_dir)] == [first]


@pytest.mark.parametrize("phase", ["train", "export", "activate"])
def test_a_crashing_retrain_fails_and_the_old_version_serves(settings_for, kt_base, tiny_training_env, phase):
    settings = settings_for("redis", tasks=["kt"], bootstrap_kt_data=kt_base,
                            retrain={"tasks": ["kt"], "inject_fault": phase})
    first = deploy_first_version(settings)
    store = open_store(settings)
    job = run_one(settings, store)
    assert job["status"] == "failed" and f"injected fault at phase '{phase}'" in job["error"]
    assert store.active_version("kt") == first and store.current_job() is None
    store.close()


def test_two_triggers_make_one_job(deployed):
    settings, store, _ = deployed
    first = store.enqueue_job(Job.queued("kt", "admin", {}))
    second = store.enqueue_job(Job.queued("kt", "schedule", {}))
    assert second["id"] == first["id"]
    worker = TrainerWorker(settings, store)
    assert worker.work_once()["id"] == first["id"]
    assert worker.work_once() is None
    assert [job["id"] for job in store.list_jobs()] == [first["id"]]
    # A trigger while a job runs queues the next one (new data may have arrived).
    third = store.enqueue_job(Job.queued("kt", "admin", {}))
    assert third["id"] != first["id"] and third["status"] == "queued"


# -- the lease --------------------------------------------------------------------------------------------------------
def test_no_job_runs_while_another_trainer_holds_the_lease(deployed):
    settings, store, _ = deployed
    holder = store.lease("retrain", ttl_s=5)
    assert holder.acquire()
    store.enqueue_job(Job.queued("kt", "admin", {}))
    assert TrainerWorker(settings, store).work_once() is None
    holder.release()
    assert TrainerWorker(settings, store).work_once()["status"] == "succeeded"


def test_a_dead_trainers_job_is_marked_failed_and_the_next_one_runs(deployed):
    settings, store, _ = deployed
    dead = store.lease("retrain", ttl_s=2)  # a trainer that took a job, then died without renewing
    assert dead.acquire()
    orphan = store.enqueue_job(Job.queued("kt", "admin", {}))
    assert store.next_job()["id"] == orphan["id"]
    store.update_job(orphan | {"status": "running"})
    waiting = store.enqueue_job(Job.queued("kt", "schedule", {}))
    worker = TrainerWorker(settings, store)
    assert worker.work_once() is None  # the lease has not expired yet
    time.sleep(2.2)
    assert worker.work_once()["id"] == waiting["id"]
    record = store.get_job(orphan["id"])
    assert record["status"] == "failed" and "lease expired" in record["error"]


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_a_job_that_lost_its_lease_cannot_activate(settings_for, backend):
    store = open_store(settings_for(backend))
    store.compare_and_set_active("kt", None, "kt-v1")
    mine = store.lease("retrain", ttl_s=1)
    assert mine.acquire()
    time.sleep(1.1)
    assert store.lease("retrain", ttl_s=5).acquire()  # another trainer took over
    assert not mine.renew()
    with pytest.raises(LeaseLost):
        store.compare_and_set_active("kt", "kt-v1", "kt-v2", lease=mine)
    assert store.active_version("kt") == "kt-v1"
    store.close()


def test_lease_renewal_keeps_it(settings_for):
    store = open_store(settings_for("redis"))
    lease = store.lease("retrain", ttl_s=1)
    assert lease.acquire()
    for _ in range(3):
        time.sleep(0.5)
        assert lease.renew()
    assert not store.lease("retrain", ttl_s=1).acquire()
    lease.release()
    assert store.lease("retrain", ttl_s=1).acquire()
    store.close()


# -- schedule ---------------------------------------------------------------------------------------------------------
def test_each_tick_queues_one_job_across_replicas(settings_for):
    settings = settings_for("redis", retrain={"tasks": ["kt"], "interval_s": 60})
    workers = [TrainerWorker(settings) for _ in range(4)]
    barrier = threading.Barrier(len(workers))
    queued = []

    def tick(worker):
        barrier.wait()
        queued.append(worker.tick("kt"))

    threads = [threading.Thread(target=tick, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = [job for job in queued if job is not None]
    assert len(jobs) == 1 and jobs[0]["trigger"] == "schedule"
    assert [job["id"] for job in workers[0].store.list_jobs()] == [jobs[0]["id"]]
    for worker in workers:
        worker.store.close()


def concurrently(workers, call) -> list:
    """Each worker makes the call at the same moment (a barrier); the results, in worker order."""
    barrier = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def one(i, worker):
        barrier.wait()
        results[i] = call(worker)

    threads = [threading.Thread(target=one, args=(i, w)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def finish(store, job: dict) -> None:
    """Records a queued job as taken and finished, as a trainer does."""
    assert store.next_job()["id"] == job["id"]
    store.update_job(job)
    store.finish_current_job(job["id"])


def test_the_volume_trigger_queues_one_job_per_n_new_interactions_across_replicas(settings_for):
    settings = settings_for("redis", retrain={"tasks": ["kt"], "volume_trigger": 5})
    workers = [TrainerWorker(settings) for _ in range(4)]
    store = workers[0].store
    store.log_interactions("kt", answers("s1", n=4))
    assert concurrently(workers, lambda w: w.check_volume("kt")) == [None] * 4  # 4 < 5
    ids = store.log_interactions("kt", answers("s2", n=1))
    jobs = [job for job in concurrently(workers, lambda w: w.check_volume("kt")) if job is not None]
    assert len(jobs) == 1 and jobs[0]["trigger"] == "volume" and jobs[0]["params"] == {}
    assert workers[1].check_volume("kt") is None  # a job waits: nothing more is queued
    # The job ran (here: recorded as run) with a snapshot up to the last id: counting starts again after it.
    finish(store, jobs[0] | {"status": "rejected", "data": {"last_logged_id": ids[-1]}})
    store.log_interactions("kt", answers("s3", n=4))
    assert concurrently(workers, lambda w: w.check_volume("kt")) == [None] * 4
    store.log_interactions("kt", answers("s3", n=1))
    again = [job for job in concurrently(workers, lambda w: w.check_volume("kt")) if job is not None]
    assert len(again) == 1 and again[0]["id"] != jobs[0]["id"]
    # A job that failed before its snapshot trained on nothing: counting goes on from the newest one that did, so
    # the same interactions trigger one retry.
    finish(store, again[0] | {"status": "failed"})
    retry = [job for job in concurrently(workers, lambda w: w.check_volume("kt")) if job is not None]
    assert len(retry) == 1 and retry[0]["id"] not in (jobs[0]["id"], again[0]["id"])
    for worker in workers:
        worker.store.close()


def test_the_full_retrain_schedule_is_its_own_trigger(settings_for):
    settings = settings_for("redis", retrain={"tasks": ["kt"], "interval_s": 60, "full_cron": "* * * * *"})
    workers = [TrainerWorker(settings) for _ in range(3)]
    full = [job for job in concurrently(workers, lambda w: w.tick("kt", full=True)) if job is not None]
    assert len(full) == 1 and full[0]["params"] == {"mode": "full"} and full[0]["trigger"] == "schedule"
    # The regular tick of the same minute claims its own tick (and joins the job already waiting for the task).
    regular = [job for job in concurrently(workers, lambda w: w.tick("kt")) if job is not None]
    assert len(regular) == 1 and regular[0]["id"] == full[0]["id"]
    scheduled = {job.id for job in workers[0].scheduler.get_jobs()} if workers[0].scheduler else set()
    assert scheduled == set()  # not started here; start_schedule adds retrain-kt, full-kt (and volume-kt when set)
    workers[0].start_schedule()
    assert {job.id for job in workers[0].scheduler.get_jobs()} == {"retrain-kt", "full-kt"}
    workers[0].scheduler.shutdown(wait=False)
    for worker in workers:
        worker.store.close()


@pytest.mark.parametrize(
    "bad",
    [{"volume_trigger": 0}, {"volume_trigger": "many"}, {"full_cron": "nightly"}, {"mode": "partial"},
     {"replay_ratio": -1}, {"replay_min": 10, "replay_max": 5}, {"volume_check_s": 0}],
)
def test_bad_trigger_and_replay_settings_are_refused(bad):
    from pydantic import ValidationError

    from gramrec.trainer.retrain.settings import RetrainSettings

    with pytest.raises(ValidationError, match="|".join(bad)):
        RetrainSettings(**bad)


def test_interval_ticks_are_aligned_and_late_runs_find_their_tick(settings_for):
    trigger = make_trigger(settings_for("embedded", retrain={"interval_s": 600}))
    now = datetime(2026, 11, 23, 10, 7, 30, tzinfo=UTC)
    assert latest_fire_time(trigger, now, timedelta(minutes=30)) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    cron = make_trigger(settings_for("embedded", retrain={"interval_s": None, "cron": "0 3 * * *"}))
    assert latest_fire_time(cron, now, timedelta(minutes=30)) is None  # 03:00 is long past the grace period
    assert latest_fire_time(cron, now, timedelta(hours=8)) == datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def test_bad_cron_is_refused():
    from pydantic import ValidationError

    from gramrec.trainer.retrain.settings import RetrainSettings

    with pytest.raises(ValidationError, match="cron"):
        RetrainSettings(cron="every day at noon")


# -- catch-up and retention -----------------------------------------------------------------------------------------
def test_items_added_or_updated_during_a_retrain_are_in_the_new_version(deployed, monkeypatch):
    """An item added through the API mid-job, and an API item whose text changed mid-job, are encoded by the
    new version's encoder before the flip is visible to anyone reading the new table."""
    from gramrec.trainer.retrain.job import RetrainJob

    settings, store, first = deployed
    store.put_items("kt", first, ["edited"], ["The original wording of a question"], np.ones((1, 32)), 32)
    export = RetrainJob._export

    def export_while_the_api_writes(self, task, report):
        store.put_items("kt", first, ["added", "edited"], ["A question added mid-retrain", "Reworded mid-retrain"],
                        np.ones((2, 32)), 32)
        return export(self, task, report)

    monkeypatch.setattr(RetrainJob, "_export", export_while_the_api_writes)
    job = run_one(settings, store)
    assert job["status"] == "succeeded", job["error"]
    bundle = ModelBundle.load(settings.artifacts_dir, job["version"], providers=["CPUExecutionProvider"])
    expected = bundle.encode_texts(["A question added mid-retrain", "Reworded mid-retrain"])
    rows = store.get_vectors(job["version"], ["added", "edited"])
    np.testing.assert_allclose(np.frombuffer(b"".join(rows), "<f4").reshape(2, -1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.retrain(keep_versions=1, retire_grace_s=0)
def test_old_versions_are_deleted_after_the_grace_period(deployed):
    settings, store, first = deployed
    job = run_one(settings, store)
    assert store.active_version("kt") == job["version"]
    assert not (settings.artifacts_dir / first).exists() and not store.has_table(first)
    assert [m["version"] for m in list_versions(settings.artifacts_dir)] == [job["version"]]


@pytest.mark.retrain(keep_versions=1, retire_grace_s=3600)
def test_old_versions_stay_during_the_grace_period_for_rollback(deployed):
    settings, store, first = deployed
    run_one(settings, store)
    assert (settings.artifacts_dir / first).exists() and store.has_table(first)
    assert first in json.loads((settings.artifacts_dir / "retired.json").read_text())
    ModelRegistry(store, settings.artifacts_dir, ["kt"]).activate(first)  # rollback
    assert store.active_version("kt") == first


# -- hot swap in API registries ----------------------------------------------------------------------------------------
def test_api_registries_swap_on_a_published_activation(deployed):
    settings, store, first = deployed
    follower = ModelRegistry(open_store(settings), settings.artifacts_dir, ["kt"])
    follower.start()
    follower.start_following()  # no polling: only the published message can make it swap
    try:
        assert follower.get("kt").version == first
        time.sleep(0.3)  # subscribed
        job = run_one(settings, store)
        deadline = time.monotonic() + 5
        while follower.get("kt").version != job["version"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.get("kt").version == job["version"] and follower.swaps == 2
    finally:
        follower.stop()
        follower.store.close()


def test_a_version_that_fails_its_golden_check_never_serves(deployed):
    settings, store, first = deployed
    job = run_one(settings, store)
    api = ModelRegistry(open_store(settings), settings.artifacts_dir, ["kt"])
    api.start()
    manifest_path = settings.artifacts_dir / job["version"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["golden"]["expected"] = [0.0] * len(manifest["golden"]["expected"])  # the model computes otherwise
    # Re-point to a broken copy of the new version under a new name, as a bad export would arrive.
    broken = job["version"].replace("kt-", "kt-broken-")
    (settings.artifacts_dir / broken).mkdir()
    for path in (settings.artifacts_dir / job["version"]).rglob("*"):
        target = settings.artifacts_dir / broken / path.relative_to(settings.artifacts_dir / job["version"])
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    (settings.artifacts_dir / broken / "manifest.json").write_text(json.dumps(manifest | {"version": broken}))
    assert store.compare_and_set_active("kt", job["version"], broken)
    assert api.sync("kt").version == job["version"]  # the old bundle keeps serving
    assert api.load_errors()["kt"]["version"] == broken
    assert "golden check" in api.load_errors()["kt"]["error"] and api.load_failures == 1
    api.stop()
    api.store.close()


def test_redis_layout_of_jobs(deployed):
    settings, store, _ = deployed
    job = store.enqueue_job(Job.queued("kt", "admin", {}))
    client = redis.Redis.from_url(REDIS_URL)
    prefix = settings.redis_key_prefix
    assert client.get(f"{prefix}retrain-pending:kt").decode() == job["id"]
    assert store.next_job()["id"] == job["id"]
    assert client.get(f"{prefix}retrain-pending:kt") is None
    assert client.get(f"{prefix}retrain-current").decode() == job["id"]
    client.close()


def test_news_retrain_end_to_end(settings_for, tmp_path, tiny_training_env):
    base = write_mind_data(tmp_path / "mind", impressions=80)
    settings = settings_for("redis", tasks=["nr"], bootstrap_nr_data=base, retrain={"tasks": ["nr"], "gate_tolerance": 1.0})
    first = deploy_first_version(settings, "nr")
    store = open_store(settings)
    store.log_interactions("nr", [{"user_id": "R1", "history": "N1 N2", "impressions": "N3-1 N4-0 N5-0",
                                   "timestamp": NOW}] * 4)
    job = store.enqueue_job(Job.queued("nr", "admin", {}))
    finished = TrainerWorker(settings, store).work_once()
    assert finished["id"] == job["id"] and finished["status"] == "succeeded", finished["error"]
    assert finished["base_version"] == first and store.active_version("nr") == finished["version"]
    assert finished["data"]["logged_interactions"] == 4 and finished["metrics"]["active"] is not None
    store.close()


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_a_trainer_clears_only_its_own_current_job_marker(settings_for, backend):
    store = open_store(settings_for(backend))
    job = store.enqueue_job(Job.queued("kt", "admin", {}))
    assert store.next_job()["id"] == job["id"] and store.current_job() == job["id"]
    store.finish_current_job("another-job")  # a trainer that lost its lease finishing late
    assert store.current_job() == job["id"]
    store.finish_current_job(job["id"])
    assert store.current_job() is None
    store.close()


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_old_finished_job_records_are_pruned(settings_for, backend):
    store = open_store(settings_for(backend))
    for n in range(5):
        store.update_job({"id": f"j{n}", "task": "kt", "status": "succeeded", "created_at": f"2026-11-23T10:0{n}"})
    store.update_job({"id": "waiting", "task": "kt", "status": "queued", "created_at": "2026-11-23T09:00"})
    store.prune_jobs(keep=2)
    assert [job["id"] for job in store.list_jobs()] == ["j4", "j3", "waiting"]
    store.close()


def test_a_news_retrain_keeps_the_base_models_abstracts(settings_for, tmp_path, tiny_training_env):
    """A base model trained on title + abstract is retrained on title + abstract (the snapshot's texts and the
    new checkpoint's settings), not on titles alone."""
    import json

    from gramrec.trainer.checkpoint import read_config

    base = write_mind_data(tmp_path / "mind", impressions=80)
    train = json.loads(tiny_training_env["GRAMREC_BOOTSTRAP_TRAIN"]) | {"use_abstract": True}
    settings = settings_for("redis", tasks=["nr"], bootstrap_nr_data=base, bootstrap_train=train,
                            retrain={"tasks": ["nr"]})
    deploy_first_version(settings, "nr")
    store = open_store(settings)
    store.enqueue_job(Job.queued("nr", "admin", {}))
    finished = TrainerWorker(settings, store).work_once()
    store.close()
    assert finished["status"] == "succeeded", finished["error"]
    texts = json.loads((settings.artifacts_dir / finished["version"] / "items.json").read_text())["texts"]
    assert texts and all(text.endswith("An abstract") for text in texts)
    checkpoint = settings.artifacts_dir / "checkpoints" / finished["version"]
    assert read_config(checkpoint)["settings"]["use_abstract"] is True


def test_the_gate_uses_the_tasks_primary_metric(deployed, monkeypatch):
    from gramrec.trainer.kt_task import KnowledgeTracingTask

    monkeypatch.setattr(KnowledgeTracingTask, "primary_metric", "acc")
    settings, store, _ = deployed
    job = run_one(settings, store)
    assert job["metrics"]["metric"] == "acc" and job["status"] in ("succeeded", "rejected"), job["error"]


def test_a_retrain_reads_no_training_variable_from_the_environment(deployed, monkeypatch):
    """GRAMREC_TRAIN_MAX_STEPS_PER_EPOCH is `gramrec train`'s; a retrain builds its settings from explicit values."""
    from gramrec.trainer import train as train_module

    seen = []
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda settings, **kw: seen.append(settings) or real(settings, **kw))
    monkeypatch.setenv("GRAMREC_TRAIN_MAX_STEPS_PER_EPOCH", "1")
    monkeypatch.setenv("GRAMREC_TRAIN_LR_CF", "0.5")
    settings, store, _ = deployed
    job = run_one(settings, store)
    assert job["status"] in ("succeeded", "rejected"), job["error"]
    (used,) = seen
    assert used.max_steps_per_epoch is None and used.lr_cf != 0.5


def test_kt_snapshot_orders_logged_answers_by_their_timestamps(settings_for, kt_base, tmp_path):
    """Backfilled answers (logged last, answered long ago) are not the newest: order and recency follow time."""
    store = open_store(settings_for("embedded"))
    store.log_interactions("kt", answers("recent1", "q1", 2) + answers("recent2", "q2", 2))
    store.log_interactions("kt", [  # backfill: logged after recent1/recent2, answered a year before
        {"user_id": "backfilled", "item_id": "q3", "correct": "1", "timestamp": "2025-11-01T09:00:00+00:00"},
        {"user_id": "recent1", "item_id": "q4", "correct": "0", "timestamp": "2025-11-01T08:00:00+00:00"},
        {"user_id": "backfilled", "item_id": "q5", "correct": "0", "timestamp": "2025-11-01T08:30:00+00:00"},
    ])
    build_snapshot("kt", kt_base, store, tmp_path / "snap", gate_fraction=0.05)
    with open(tmp_path / "snap" / "interactions.csv") as f:
        logged = [(r["user_id"], r["item_id"]) for r in csv.DictReader(f)][600:]
    assert logged == [("recent1", "q4"), ("backfilled", "q5"), ("backfilled", "q3")] + [("recent1", "q1")] * 2 + [
        ("recent2", "q2")] * 2
    assert read_split(tmp_path / "snap").test == {"recent1", "recent2"}  # not the backfilled student
    store.close()
