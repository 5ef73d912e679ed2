"""Process-level faults and scale-out of the retrain loop: a trainer killed mid-retrain, and 4 uvicorn workers with
2 trainer replicas running exactly one retrain per trigger and per schedule tick."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.helpers.deployment import ADMIN, finished, job, wait_for
from tests.helpers.fakes import redis_client


def jobs_in_redis(prefix: str) -> list[dict]:
    client = redis_client()
    try:
        return [json.loads(record) for record in client.hvals(f"{prefix}jobs")]
    finally:
        client.close()


def test_trainer_killed_mid_retrain(deployment):
    """SIGKILL the trainer running a job: its lease expires, the job is marked failed, and the next scheduled
    retrain runs on the surviving trainer."""
    url = deployment.serve().url
    # Ticks every 6 s; the first trainer is started alone so it takes the long admin job.
    first = deployment.start("trainer", GRAMREC_RETRAIN__INTERVAL_S="6")
    with httpx.Client(base_url=url, timeout=30) as http:
        slow = http.post("/admin/retrain", json={"task": "kt", "epochs": 100}, headers=ADMIN).json()
        running = wait_for(lambda: (j := job(http, slow["id"]))["status"] == "running" and j, 60, "the job to run")
        assert running["worker"].endswith(f":{first.pid}")
        second = deployment.start("trainer", GRAMREC_RETRAIN__INTERVAL_S="6")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.monotonic()

        record = finished(http, slow["id"], timeout_s=60)
        assert record["status"] == "failed" and "lease expired" in record["error"]
        assert time.monotonic() - killed_at < 4 + 15  # the lease TTL plus start-up and polling

        def next_scheduled() -> dict | None:
            later = [j for j in jobs_in_redis(deployment.prefix) if j["trigger"] == "schedule"
                     and j["status"] == "succeeded" and j["started_at"] > running["started_at"]]
            return later[0] if later else None

        scheduled = wait_for(next_scheduled, 60, "the next scheduled retrain")
        assert scheduled["worker"].endswith(f":{second.pid}")
        assert http.get("/readyz").status_code == 200


def test_four_api_workers_and_two_trainers_run_one_retrain_per_trigger(deployment):
    url = deployment.serve(workers=4).url
    for _ in range(2):
        deployment.start("trainer")
    with httpx.Client(base_url=url, timeout=30) as http:
        # A burst of triggers, spread over the workers by the kernel, joins one job.
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda _: http.post("/admin/retrain", json={"task": "kt"}, headers=ADMIN).json(),
                                  range(8)))
        assert len({j["id"] for j in burst}) == 1
        assert finished(http, burst[0]["id"])["status"] == "succeeded"
        # Sequential triggers: one job each.
        for _ in range(2):
            one = http.post("/admin/retrain", json={"task": "kt"}, headers=ADMIN).json()
            assert finished(http, one["id"])["status"] == "succeeded"
    jobs = sorted(jobs_in_redis(deployment.prefix), key=lambda j: j["started_at"])
    assert len(jobs) == 3 and all(j["status"] == "succeeded" for j in jobs)
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["finished_at"] <= later["started_at"]  # never two at once
