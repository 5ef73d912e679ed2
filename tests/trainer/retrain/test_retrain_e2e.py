"""The retrain loop across real processes: `gramrec serve` (uvicorn) and `gramrec trainer` over Redis on loopback.

Under continuous /predict load: interactions logged, retrains triggered (two at once make one job), an item added
while a retrain runs, rollback and roll-forward through the admin API; zero failed requests, and every response's
model_version was active during the test. Then the schedule: two trainer replicas, one job per tick.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.helpers.deployment import ADMIN, finished, job, wait_for
from tests.helpers.fakes import redis_client
from tests.helpers.load import Load

LOAD_CLIENTS = 3
TEST_BUDGET_S = 240  # every wait below is bounded; the whole test stops by itself
MAX_REQUESTS = 200_000


PREDICT = {"task": "kt", "history": [{"item_id": "q1", "correct": 1}, {"item_id": "q2", "correct": 0}],
           "targets": ["q3", "q4"]}


def predict(client: httpx.Client, n: int) -> httpx.Response:
    return client.post("/predict", json=PREDICT)


def latest_version(load: Load) -> str | None:
    """The model version of the newest successful prediction so far."""
    return next((o.model_version for o in reversed(load.outcomes) if o.status == 200), None)


def test_retrain_loop_under_load(deployment):
    url = deployment.serve().url
    deployment.start("trainer")
    active = {deployment.first}  # every version that was active at some point of the test
    load = Load(url, predict, workers=LOAD_CLIENTS, max_requests=MAX_REQUESTS, max_seconds=TEST_BUDGET_S)
    with httpx.Client(base_url=url, timeout=30) as http, load:
        wait_for(lambda: len(load.outcomes) > 20, 30, "load to start")
        body = {"task": "kt", "user_id": "new-student", "events": [{"item_id": "q5", "correct": 1}] * 6}
        assert http.post("/interactions", json=body).status_code == 201

        # Swap 1: a retrain on demand; its model answers the next predictions.
        first_job = http.post("/admin/retrain", json={"task": "kt"}, headers=ADMIN).json()
        v1 = finished(http, first_job["id"])
        assert v1["status"] == "succeeded", v1
        active.add(v1["version"])
        wait_for(lambda: latest_version(load) == v1["version"], 10, "predictions from the new version")
        assert v1["data"]["logged_interactions"] == 6

        # Swap 2: an item added while the retrain runs is in the new version's table.
        slow = http.post("/admin/retrain", json={"task": "kt", "epochs": 60}, headers=ADMIN).json()
        wait_for(lambda: job(http, slow["id"])["status"] == "running", 30, "the retrain to start")
        added = http.post("/items", json={"task": "kt", "items": [{"item_id": "mid-retrain",
                                                                   "text": "A question added during a retrain"}]})
        assert added.status_code == 200 and added.json()["model_version"] == v1["version"]
        assert job(http, slow["id"])["status"] == "running"  # it really was added mid-job
        v2 = finished(http, slow["id"])
        assert v2["status"] == "succeeded", v2
        active.add(v2["version"])
        wait_for(lambda: latest_version(load) == v2["version"], 10, "predictions from the second version")
        item = http.get("/items/kt/mid-retrain")
        assert item.status_code == 200 and item.json()["model_version"] == v2["version"]

        # Swap 3: two simultaneous triggers run one job.
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: http.post("/admin/retrain", json={"task": "kt"}, headers=ADMIN).json(),
                                 range(2)))
        assert both[0]["id"] == both[1]["id"]
        v3 = finished(http, both[0]["id"])
        assert v3["status"] == "succeeded", v3
        active.add(v3["version"])

        # Swaps 4 and 5: rollback and roll forward through the admin API.
        for version in (v2["version"], v3["version"]):
            response = http.post(f"/admin/models/{version}/activate", headers=ADMIN)
            assert response.status_code == 200, response.text
            wait_for(lambda wanted=version: latest_version(load) == wanted, 10, f"predictions from {version}")
        jobs = http.get("/admin/jobs", headers=ADMIN).json()["jobs"]
        time.sleep(0.5)

    assert [j["id"] for j in jobs] == [v3["id"], v2["id"], v1["id"]]  # newest first; no duplicate job
    assert all(j["status"] == "succeeded" and j["timings"] for j in jobs)
    statuses = {o.status for o in load.outcomes}
    assert statuses == {200}, [o for o in load.outcomes if o.status != 200][:5]
    served = {o.model_version for o in load.outcomes}
    assert served <= active and len(served) >= 4, (served, active)
    assert len(load.outcomes) > 200


def test_schedule_runs_one_job_per_tick_across_trainer_replicas(deployment):
    """The invariant, not a timing: every claimed tick queued exactly one job or joined the one still waiting
    (a retrain may outlast the 4 s tick on a loaded machine, so several ticks can join one job), no tick was lost,
    no job appeared without a tick, and never two retrains ran at once."""
    client = redis_client()
    interval = 4
    trainers = [deployment.start("trainer", GRAMREC_RETRAIN__INTERVAL_S=str(interval), GRAMREC_LOG_LEVEL="INFO")
                for _ in range(2)]

    def finished_jobs() -> list[dict]:
        return [j for j in _jobs(client, deployment.prefix) if j["status"] not in ("queued", "running")]

    wait_for(lambda: len(finished_jobs()) >= 3, 90, "three scheduled retrains")
    for trainer in trainers:
        trainer.send_signal(signal.SIGTERM)  # a running job finishes first
    for trainer in trainers:
        trainer.wait(timeout=60)
    claimed = {key.decode().rsplit(":", 1)[1] for key in client.scan_iter(match=f"{deployment.prefix}tick:kt:*")}
    queued = _queued_by_tick(deployment.tmp.glob("trainer-*.log"))  # tick -> job ids it queued or joined
    jobs = {j["id"]: j for j in _jobs(client, deployment.prefix)}
    assert all(j["trigger"] == "schedule" for j in jobs.values())
    assert set(queued) == claimed, "every claimed tick queued or joined a job, and no tick was queued unclaimed"
    assert all(len(ids) == 1 for ids in queued.values()), queued  # one job per claimed tick, on one replica
    assert {i for ids in queued.values() for i in ids} == set(jobs), "every job came from a tick; none was lost"
    done = sorted((j for j in jobs.values() if j.get("finished_at")), key=lambda j: j["started_at"])
    assert len(done) >= 3 and all(j["status"] == "succeeded" for j in done), done
    for earlier, later in zip(done, done[1:]):
        assert earlier["finished_at"] <= later["started_at"]  # never two retrains at once
    client.close()


def _queued_by_tick(logs) -> dict[str, list[str]]:
    """The trainers' `scheduled retrain queued` log records: claimed tick (as in its Redis key) -> job ids."""
    import json
    from datetime import datetime

    queued: dict[str, list[str]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == "scheduled retrain queued":
                tick = datetime.fromisoformat(record["tick"]).strftime("%Y%m%dT%H%M%S")
                queued.setdefault(tick, []).append(record["job"])
    return queued


def _jobs(client, prefix: str) -> list[dict]:
    import json

    return [json.loads(record) for record in client.hvals(f"{prefix}jobs")]
