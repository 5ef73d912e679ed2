"""Hot swaps under load on a real `gramrec serve` process (one uvicorn worker, Redis on loopback).

8 clients post /predict and /recommend (alternately) back to back for 60 s: a steady phase, then a phase with a swap every 1.5 s (the way a
trainer swaps: compare-and-set on the pointer plus a published message). Zero failed requests; p99 latency during
the swap phase at most 1.5x the steady phase's; then 100 swap cycles without load, and the server's resident
memory grows by less than 50 MB.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from gramrec.service.store import open_store
from gramrec.trainer.bootstrap import train_and_export
from tests.helpers.deployment import Deployment, wait_for
from tests.helpers.load import Load

CLIENTS = 8
STEADY_S = 20
SWAPPING_S = 40
SWAP_EVERY_S = 1.5
MEMORY_CYCLES = 100
MAX_REQUESTS = 200_000  # far above what 60 s can send; the time bound ends the load
PREDICT = {"task": "kt", "history": [{"item_id": f"q{i % 16}", "correct": i % 2} for i in range(20)],
           "targets": ["q3", "q4", "q5"]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


RECOMMEND = {"task": "kt", "history": PREDICT["history"], "k": 5, "target": 0.7}


def predict(client: httpx.Client, n: int) -> httpx.Response:
    """Every other request is a /recommend: it too must never fail during a swap."""
    if n % 2:
        return client.post("/recommend", json=RECOMMEND)
    return client.post("/predict", json=PREDICT)


def p99(load: Load, start: float, end: float) -> float:
    latencies = [o.elapsed for o in load.outcomes if start <= o.started < end]
    assert len(latencies) > 200, len(latencies)
    return float(np.percentile(latencies, 99))


@pytest.fixture
def two_versions(tmp_path, tiny_training_env):
    deployment = Deployment(tmp_path, tiny_training_env)
    second = train_and_export(deployment.settings, "kt").name
    yield deployment, deployment.first, second
    deployment.stop()


def test_hot_swaps_under_load(two_versions):
    deployment, first, second = two_versions
    server = deployment.serve()
    url = server.url
    store = open_store(deployment.settings)

    def swap_to(version: str) -> None:
        assert store.compare_and_set_active("kt", store.active_version("kt"), version)
        store.publish_activation("kt", version)

    def wait_serving(http: httpx.Client, version: str) -> None:
        wait_for(lambda: http.get("/readyz").json()["models"]["kt"] == version, 10, f"{version} to serve")

    swaps = 0
    load = Load(url, predict, workers=CLIENTS, max_requests=MAX_REQUESTS, max_seconds=STEADY_S + SWAPPING_S + 60)
    with httpx.Client(base_url=url, timeout=10) as http:
        with load:
            began = time.monotonic()
            time.sleep(STEADY_S)
            swap_phase = time.monotonic()
            versions = [second, first]
            while time.monotonic() < swap_phase + SWAPPING_S:
                swap_to(versions[swaps % 2])
                swaps += 1
                time.sleep(SWAP_EVERY_S)
            ended = time.monotonic()

        assert ended - began >= 60 and swaps >= 20
        assert {o.status for o in load.outcomes} == {200}, [o for o in load.outcomes if o.status != 200][:5]
        assert {o.model_version for o in load.outcomes} == {first, second}
        steady, swapping = p99(load, began + 2, swap_phase), p99(load, swap_phase, ended)
        print(f"p99 steady {steady * 1000:.1f} ms, during swaps {swapping * 1000:.1f} ms, {swaps} swaps, "
              f"{len(load.outcomes) / (ended - began):.0f} req/s")
        assert swapping <= 1.5 * steady, (steady, swapping)

        # Memory over many swap cycles (to the other version and back), without load.
        def cycle() -> None:
            active = store.active_version("kt")
            for version in (first if active == second else second, active):
                swap_to(version)
                wait_serving(http, version)

        for _ in range(10):  # warm-up: allocator pools and caches reach their working size
            cycle()
        before = rss_mb(server.process.pid)
        for _ in range(MEMORY_CYCLES):
            cycle()
        after = rss_mb(server.process.pid)
        print(f"resident memory {before:.0f} MB -> {after:.0f} MB over {MEMORY_CYCLES} swap cycles")
        assert after - before < 50
    store.close()
