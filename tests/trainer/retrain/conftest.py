"""Fixtures of the retrain tests."""

from __future__ import annotations

import pytest

from tests.helpers.deployment import Deployment
from tests.helpers.fakes import redis_client


@pytest.fixture
def deployment(tmp_path, tiny_training_env):
    """A kt deployment (base data, first version, Redis prefix) to start `gramrec serve` and `gramrec trainer`
    processes in; stopped after the test."""

    redis_client().close()  # skips without Redis
    deployment = Deployment(tmp_path, tiny_training_env)
    yield deployment
    deployment.stop()
