"""Shared helpers of the service tests: a numpy-only fake ModelBundle, store fixtures over Redis and sqlite.

The fake has the ModelBundle interface (service/bundle.py) with deterministic, cheap arithmetic, so API tests
check the service's plumbing, not a model. Real-model tests are in test_service_e2e.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/15"
ADMIN_TOKEN = "s3cret-token"  # the admin token of the API tests' apps
DIM = 8


def text_vector(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeBundle:
    def __init__(self, version: str, task: str, n_items: int = 20, has_encoder: bool = True, dim: int = DIM):
        self.version, self.task, self.dim = version, task, dim
        self.strategy = "gram" if has_encoder else "nocontent"
        self.max_tokens = 32
        self.has_encoder = has_encoder
        self.manifest = {
            "version": version,
            "task": task,
            "strategy": self.strategy,
            "dim": dim,
            "created": version.split("-", 1)[1],
            "metrics": {"auc": 0.7},
        }
        self.ids = [f"{task}{i}" for i in range(n_items)]
        self.texts = {item_id: f"text of {item_id}" for item_id in self.ids}
        self.warmed = False
        self.encoded: list[str] = []

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        assert self.has_encoder
        self.encoded += texts
        return np.stack([text_vector(t, self.dim) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def predict_kt(self, history: np.ndarray, history_correct: np.ndarray, targets: np.ndarray) -> np.ndarray:
        assert self.task == "kt" and history.shape[0] == history_correct.shape[0]
        sign = 2.0 * np.asarray(history_correct, np.float32) - 1.0
        state = (history * sign[:, None]).mean(0) if len(history) else np.zeros(self.dim, np.float32)
        return (1 / (1 + np.exp(-(targets @ state)))).astype(np.float32)

    def score_news(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        assert self.task == "nr"
        return (candidates @ history.mean(0)).astype(np.float32)

    def item_embeddings(self) -> tuple[list[str], np.ndarray]:
        return list(self.ids), np.stack([text_vector(self.texts[i], self.dim) for i in self.ids])

    def item_metadata(self) -> list[dict] | None:
        """nr items alternate between two categories (and four subcategories); kt items have none."""
        if self.task != "nr":
            return None
        return [
            {"category": ("sports", "news")[i % 2], "subcategory": f"sub{i % 4}"} for i in range(len(self.ids))
        ]
    def catalog_ids(self) -> list[str]:
        return self.ids

    def catalog_text(self, item_id: str) -> str | None:
        return self.texts.get(item_id)

    def warm_up(self) -> None:
        self.warmed = True

    def self_check(self) -> None:
        if getattr(self, "broken", None):
            raise ValueError(self.broken)


class FakeArtifacts:
    """Stands in for the artifacts directory: versions by name, `load` and `list_versions` callables."""

    def __init__(self, *bundles: FakeBundle):
        self.bundles = {b.version: b for b in bundles}
        self.loads: list[str] = []

    def add(self, bundle: FakeBundle) -> FakeBundle:
        self.bundles[bundle.version] = bundle
        return bundle

    def load(self, root: Path, version: str) -> FakeBundle:
        self.loads.append(version)
        return self.bundles[version]

    def list_versions(self, root: Path) -> list[dict]:
        return sorted((b.manifest for b in self.bundles.values()), key=lambda m: m["created"], reverse=True)


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    return client


def drop_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
