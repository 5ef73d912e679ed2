"""Fixtures of the API tests: a TestClient over the app with each module's `artifacts` fake, on both stores."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gramrec.service.app import create_app
from tests.helpers.fakes import ADMIN_TOKEN, FakeArtifacts


@pytest.fixture
def make_client(settings_for, artifacts):
    """make(backend, artifacts=the module's artifacts, **settings) -> an entered TestClient, closed at teardown."""
    clients = []

    def make(backend: str, artifacts: FakeArtifacts = artifacts, **overrides) -> TestClient:
        settings = settings_for(backend, **({"admin_token": ADMIN_TOKEN} | overrides))
        app = create_app(settings, load_bundle=artifacts.load, list_versions=artifacts.list_versions)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture(params=["redis", "embedded"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def client(make_client, backend) -> TestClient:
    return make_client(backend)
