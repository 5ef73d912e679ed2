"""Trainers publish a heartbeat in the store; `gramrec trainer --health` (the compose healthcheck) reads it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from gramrec.service.store import open_store
from gramrec.trainer.retrain.worker import TrainerWorker, live_trainers, trainer_health
from tests.helpers.serve_process import ROOT


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_heartbeat_makes_the_trainer_healthy(settings_for, backend):
    settings = settings_for(backend)
    store = open_store(settings)
    try:
        assert trainer_health(settings) == (False, trainer_health(settings)[1])
        assert "no trainer heartbeat from host" in trainer_health(settings)[1]
        worker = TrainerWorker(settings, store)
        worker.beat()
        (name,) = live_trainers(store)
        assert name == worker.name and name.startswith(socket.gethostname() + ":")
        assert live_trainers(store)[name]["status"] == "starting"
        healthy, message = trainer_health(settings)
        assert healthy and worker.name in message
        assert trainer_health(settings, host="another-host")[0] is False
    finally:
        store.close()


def test_health_command_exits_1_without_a_trainer(settings_for, tmp_path):
    settings = settings_for("sqlite")
    env = {"GRAMREC_EMBEDDED_STORE_PATH": str(settings.embedded_store_path), "REDIS_URL": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "gramrec.trainer.cli", "trainer", "--health"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "no trainer heartbeat from host" in result.stderr
