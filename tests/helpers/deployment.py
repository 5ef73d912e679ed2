"""A kt deployment of real processes for end-to-end tests: a Redis prefix, an artifacts dir with a first version,
and the `gramrec serve` / `gramrec trainer` processes started on them; plus bounded waits on admin jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from gramrec.service.settings import ServiceSettings
from tests.helpers.fakes import REDIS_URL, drop_prefix, redis_client
from tests.helpers.retrain_data import deploy_first_version, write_kt_data
from tests.helpers.serve_process import ROOT, ServeProcess

TOKEN = "retrain-e2e-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Deployment:
    """A Redis prefix, an artifacts dir with a first kt version, and the processes started on them."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp = tmp
        self.prefix = f"gramrec-e2e-{uuid.uuid4().hex[:10]}:"
        self.artifacts = tmp / "artifacts"
        self.base = write_kt_data(tmp / "kt-base")
        self.env = os.environ | env | {
            "REDIS_URL": REDIS_URL,
            "GRAMREC_REDIS_KEY_PREFIX": self.prefix,
            "GRAMREC_ARTIFACTS_DIR": str(self.artifacts),
            "GRAMREC_ADMIN_TOKEN": TOKEN,
            "GRAMREC_BOOTSTRAP": "false",
            "GRAMREC_BOOTSTRAP_KT_DATA": str(self.base),
            "GRAMREC_TASKS": "kt",
            "GRAMREC_ORT_THREADS": "1",
            "GRAMREC_MODEL_POLL_INTERVAL_S": "2",
            "GRAMREC_RETRAIN__TASKS": "kt",
            "GRAMREC_RETRAIN__INTERVAL_S": "86400",
            "GRAMREC_RETRAIN__POLL_S": "0.2",
            "GRAMREC_RETRAIN__LEASE_TTL_S": "4",
            # Promote every retrain: the gate's slice of this generated data is too small to judge a model by.
            "GRAMREC_RETRAIN__GATE_TOLERANCE": "1.0",
        }
        self.settings = ServiceSettings(
            redis_url=REDIS_URL, redis_key_prefix=self.prefix, artifacts_dir=self.artifacts, tasks=["kt"],
            bootstrap_kt_data=self.base,
        )
        self.first = deploy_first_version(self.settings)
        self.processes: list[subprocess.Popen] = []
        self.servers: list[ServeProcess] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        log = self.tmp / f"{args[0]}-{len(self.processes)}.log"  # a file: an unread pipe would fill and block
        with open(log, "ab") as output:
            process = subprocess.Popen([sys.executable, "-m", "gramrec.trainer.cli", *args], cwd=ROOT, env=self.env | env,
                                       stdout=output, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def serve(self, workers: int = 1) -> ServeProcess:
        server = ServeProcess(self.tmp / f"serve-{len(self.servers)}.log", self.env, workers=workers)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        client = redis_client()
        drop_prefix(client, self.prefix)
        client.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def job(http: httpx.Client, job_id: str) -> dict:
    return http.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()


def finished(http: httpx.Client, job_id: str, timeout_s: float = 90) -> dict:
    return wait_for(lambda: (j := job(http, job_id))["status"] not in ("queued", "running") and j, timeout_s,
                    f"job {job_id}")
