"""First start on a real `gramrec serve` process and real Redis: the server answers at once, /readyz shows the
first-start progress, the task serves when its model is exported, and the store's lease lets one process train."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest

from gramrec.service.artifact import list_versions
from gramrec.service.settings import ServiceSettings
from gramrec.service.store import open_store
from tests.helpers.fakes import REDIS_URL, drop_prefix, redis_client
from tests.helpers.serve_process import ServeProcess


@pytest.fixture
def redis_prefix():
    client = redis_client()
    prefix = f"gramrec-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    drop_prefix(client, prefix)
    client.close()


def first_start_env(tmp_path, tiny_encoder_dir, shared_data, prefix: str) -> dict[str, str]:
    train = {"encoder_dir": str(tiny_encoder_dir), "hidden_dim": 16, "max_tokens": 16, "progress": True}
    return {
        "GRAMREC_BOOTSTRAP": "true",
        "GRAMREC_BOOTSTRAP_TRAIN": json.dumps(train),
        "GRAMREC_BOOTSTRAP_KT_DATA": str(shared_data / "codeworkout_s19"),
        "GRAMREC_BOOTSTRAP_MAX_STEPS_PER_EPOCH": "3",
        "GRAMREC_BOOTSTRAP_DEVICE": "cpu",
        "GRAMREC_TASKS": "kt",
        "GRAMREC_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "GRAMREC_MODEL_POLL_INTERVAL_S": "0.5",
        "REDIS_URL": REDIS_URL,
        "GRAMREC_REDIS_KEY_PREFIX": prefix,
        "GRAMREC_LOG_LEVEL": "",  # the default of `gramrec serve`: info
    }


def wait_listening(server: ServeProcess, timeout_s: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"not listening within {timeout_s}s: {server.log()[-3000:]}")


def test_server_answers_while_its_first_model_trains(tmp_path, tiny_encoder_dir, shared_data, redis_prefix):
    env = first_start_env(tmp_path, tiny_encoder_dir, shared_data, redis_prefix)
    server = ServeProcess(tmp_path / "serve.log", env).start(wait_ready=False)
    try:
        wait_listening(server)
        ready = httpx.get(server.url + "/readyz", timeout=5)
        assert ready.status_code == 503, ready.text  # listening long before the model exists
        detail = ready.json()["detail"]
        assert detail["missing_tasks"] == ["kt"] and "kt" in detail["first_start"]
        seen = {detail["first_start"]["kt"].get("status")}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            response = httpx.get(server.url + "/readyz", timeout=5)
            if response.status_code == 200:
                break
            seen.add(response.json()["detail"]["first_start"]["kt"].get("status"))
            time.sleep(0.3)
        assert response.status_code == 200, server.log()[-3000:]
        assert "training" in seen
        (manifest,) = list_versions(tmp_path / "artifacts")
        assert response.json()["models"] == {"kt": manifest["version"]}
        deadline = time.monotonic() + 20  # the parent logs the end once its child has exited
        while "first start: model exported" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        listening = [line for line in lines if line["event"].startswith("gramrec serving on")]
        assert len(listening) == 1 and listening[0]["level"] == "info" and "/docs" in listening[0]["event"]
        first_start = [line for line in lines if line["event"].startswith("first start")]
        assert first_start and all(line["level"] == "info" for line in first_start)
        assert any(line["event"] == "first start: model exported" for line in first_start)
    finally:
        server.stop()


def test_two_replicas_train_one_first_model(tmp_path, tiny_encoder_dir, shared_data, redis_prefix):
    """Two servers on one Redis and one artifacts folder: one takes the lease and trains, the other waits for its
    version; both end up serving the same one."""
    env = first_start_env(tmp_path, tiny_encoder_dir, shared_data, redis_prefix)
    servers = [ServeProcess(tmp_path / f"serve-{n}.log", env).start(wait_ready=False) for n in range(2)]
    try:
        for server in servers:
            server.wait_ready(timeout_s=240)
        versions = list_versions(tmp_path / "artifacts")
        assert len(versions) == 1, versions
        models = [httpx.get(s.url + "/readyz", timeout=5).json()["models"] for s in servers]
        assert models == [{"kt": versions[0]["version"]}] * 2
        trained = ["first start: no model yet; training one" in s.log() for s in servers]
        waited = ["another process is training this task" in s.log() for s in servers]
        assert sorted(trained) == [False, True] and trained != waited, [s.log()[-2000:] for s in servers]
    finally:
        for server in servers:
            server.stop()


def test_a_held_first_start_lease_makes_others_wait(tmp_path, redis_prefix, shared_data):
    """With the lease held elsewhere, bootstrap trains nothing: it waits (and gives up only when stopped)."""
    from gramrec.trainer.bootstrap import FIRST_START, bootstrap

    settings = ServiceSettings(
        redis_url=REDIS_URL, redis_key_prefix=redis_prefix, artifacts_dir=tmp_path / "artifacts", tasks=["kt"],
        bootstrap_kt_data=shared_data / "codeworkout_s19",
    )
    store = open_store(settings)
    try:
        holder = store.lease(f"{FIRST_START}:kt", 30)
        assert holder.acquire()
        stop = threading.Event()
        result: list = []
        thread = threading.Thread(target=lambda: result.append(bootstrap(settings, store, stop, poll_s=0.1)))
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive()  # still waiting for the holder's version
        stop.set()
        thread.join(timeout=10)
        assert result == [["kt"]] and list_versions(tmp_path / "artifacts") == []
        holder.release()
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_beacons_expire(tmp_path, redis_prefix, backend):
    if backend == "redis":
        settings = ServiceSettings(redis_url=REDIS_URL, redis_key_prefix=redis_prefix)
    else:
        settings = ServiceSettings(redis_url=None, embedded_store_path=tmp_path / "store.sqlite3")
    store = open_store(settings)
    try:
        store.put_beacon("first-start", "kt", {"status": "training", "done": 3}, ttl_s=0.3)
        assert store.beacons("first-start") == {"kt": {"status": "training", "done": 3}}
        store.put_beacon("trainer", "host:1", {"status": "idle"}, ttl_s=30)
        time.sleep(0.5)
        assert store.beacons("first-start") == {}
        assert store.beacons("trainer") == {"host:1": {"status": "idle"}}
        store.drop_beacon("trainer", "host:1")
        assert store.beacons("trainer") == {}
    finally:
        store.close()


def children_of(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_server_takes_its_first_start_training_with_it(tmp_path, tiny_encoder_dir, shared_data, redis_prefix):
    import os

    env = first_start_env(tmp_path, tiny_encoder_dir, shared_data, redis_prefix)
    env["GRAMREC_BOOTSTRAP_MAX_STEPS_PER_EPOCH"] = "200"  # long enough to be killed in the middle
    server = ServeProcess(tmp_path / "serve.log", env).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 120
        while "first start: training" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "first start: training" in server.log(), server.log()[-2000:]
        children = children_of(server.process.pid)
        assert children
        server.kill()
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{pid}") for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}/stat")
                 and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert alive == [], "the first-start child outlived its server"
        assert list_versions(tmp_path / "artifacts") == []
    finally:
        server.stop()
