"""The per-student kt state cache (service/kt_cache.py): a cached, continued state must serve the probabilities of the
whole history run from scratch, and never another history's or version's. Real tiny exports (exported_artifacts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gramrec.service.app import create_app
from gramrec.service.artifact import KT_STEP_FILE, write_manifest
from gramrec.service.bundle import ModelBundle
from gramrec.service.kt_cache import LOOKBACK, KTStateCache
from gramrec.service.settings import ServiceSettings

VERSION = "kt-e2e-v1"
CPU = ["CPUExecutionProvider"]
ITEMS = [f"kt-item-{i}" for i in range(12)]


@pytest.fixture(scope="module")
def bundle(exported_artifacts) -> ModelBundle:
    return ModelBundle.load(exported_artifacts, VERSION, providers=CPU)


class Student:
    """A random history over made-up ids; each id has its own fixed random vector."""

    def __init__(self, rng: np.random.Generator, dim: int, vectors: dict[str, np.ndarray]):
        self.rng, self.dim, self.vectors = rng, dim, vectors
        self.ids: list[str] = []
        self.correct: list[int] = []

    def answer(self, count: int = 1) -> None:
        for _ in range(count):
            item_id = f"q{int(self.rng.integers(0, 30))}"
            self.vectors.setdefault(item_id, self.rng.standard_normal(self.dim).astype(np.float32))
            self.ids.append(item_id)
            self.correct.append(int(self.rng.integers(0, 2)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        history = np.stack([self.vectors[i] for i in self.ids]) if self.ids else np.zeros((0, self.dim), np.float32)
        return history, np.asarray(self.correct, np.int64)


def assert_served_as_uncached(bundle: ModelBundle, cache: KTStateCache, student: Student, targets: np.ndarray) -> None:
    history, correct = student.arrays()
    assert bundle.kt_output is not None
    state = cache.state(bundle, student.ids, history, correct)
    got = bundle.kt_output.probabilities(state, bundle.kt_output.item_terms(targets))
    np.testing.assert_allclose(got, bundle.predict_kt(history, correct, targets), rtol=0, atol=1e-5)
    np.testing.assert_allclose(state, bundle.kt_state(history, correct), rtol=0, atol=1e-5)


def one_student(bundle: ModelBundle, seed: int, targets: int, entries: int):
    """(the student, random targets [targets, D], an empty cache of `entries`)."""
    rng = np.random.default_rng(seed)
    student = Student(rng, bundle.dim, {})
    return student, rng.standard_normal((targets, bundle.dim)).astype(np.float32), KTStateCache(VERSION, entries)


@pytest.mark.parametrize(
    ("entries", "hits", "misses"),
    [(100, 33, 3), (2, 0, 36)],  # three students over two entries: each one is evicted before its next turn
    ids=["growing", "evicted"],
)
def test_round_robin_students_are_served_as_from_scratch_within_the_bound(bundle, entries, hits, misses):
    rng = np.random.default_rng(0)
    vectors: dict[str, np.ndarray] = {}
    students = [Student(rng, bundle.dim, vectors) for _ in range(3)]
    targets = rng.standard_normal((7, bundle.dim)).astype(np.float32)
    cache = KTStateCache(VERSION, entries)
    for _ in range(12):  # round-robin, 1 to 3 new answers each, as a client resending its growing history
        for student in students:
            student.answer(int(rng.integers(1, 4)))
            assert_served_as_uncached(bundle, cache, student, targets)
            assert len(cache) <= entries
    assert (cache.hits, cache.misses) == (hits, misses)


def test_repeated_requests_hit_and_the_empty_history_is_the_start_state(bundle):
    student, targets, cache = one_student(bundle, seed=1, targets=3, entries=10)
    assert_served_as_uncached(bundle, cache, student, targets)  # no answers: never cached
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
    student.answer(5)
    for _ in range(3):
        assert_served_as_uncached(bundle, cache, student, targets)
    assert (cache.hits, cache.misses, len(cache)) == (2, 1, 1)


def test_a_history_that_shrinks_or_changes_in_the_middle_never_hits_a_wrong_prefix(bundle):
    student, targets, cache = one_student(bundle, seed=3, targets=5, entries=100)
    student.answer(10)
    assert_served_as_uncached(bundle, cache, student, targets)
    full_ids, full_correct = list(student.ids), list(student.correct)
    student.ids, student.correct = full_ids[:6], full_correct[:6]  # shrinks: no prefix of it was stored
    assert_served_as_uncached(bundle, cache, student, targets)
    student.ids, student.correct = full_ids, full_correct[:4] + [1 - full_correct[4]] + full_correct[5:]
    assert_served_as_uncached(bundle, cache, student, targets)  # one answer flipped in the middle
    student.ids = full_ids[:3] + ["q-other"] + full_ids[4:]
    student.correct = list(full_correct)
    student.vectors["q-other"] = student.rng.standard_normal(bundle.dim).astype(np.float32)
    assert_served_as_uncached(bundle, cache, student, targets)  # one item replaced in the middle
    assert cache.hits == 0 and cache.misses == 4


def test_only_the_last_few_prefixes_are_looked_up(bundle):
    student, targets, cache = one_student(bundle, seed=4, targets=2, entries=10)
    student.answer(3)
    assert_served_as_uncached(bundle, cache, student, targets)
    student.answer(LOOKBACK - 1)  # the stored prefix is the oldest one looked up
    assert_served_as_uncached(bundle, cache, student, targets)
    assert cache.hits == 1
    student.answer(LOOKBACK)  # too far behind: the whole history runs again
    assert_served_as_uncached(bundle, cache, student, targets)
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_version_is_the_root_of_every_key():
    ids, correct = ["q1", "q2"], np.array([1, 0])
    (_, one), (_, other) = KTStateCache("kt-a", 4).digests(ids, correct), KTStateCache("kt-b", 4).digests(ids, correct)
    assert not set(one) & set(other)
    assert KTStateCache("kt-a", 4).digests(ids, correct) == (1, one)  # and nothing else: the same in every worker


def test_a_prefix_has_one_key_whatever_follows_it():
    """The key of the first t answers, read off a longer history, is the key that history's prefix stored."""
    cache = KTStateCache("kt-a", 4)
    ids = [f"q{i}" for i in range(3 * LOOKBACK)]
    correct = np.arange(len(ids)) % 2
    first, keys = cache.digests(ids, correct)
    assert first == len(ids) - LOOKBACK + 1 and len(keys) == LOOKBACK
    for length in range(first, len(ids) + 1):
        assert cache.digests(ids[:length], correct[:length])[1][-1] == keys[length - first]
    assert len(set(keys)) == LOOKBACK
    flipped = correct.copy()
    flipped[0] = 1 - flipped[0]  # an answer changed long before the looked-up lengths still changes every key
    assert not set(cache.digests(ids, flipped)[1]) & set(keys)
    assert cache.digests(["q1", "2"], np.array([1, 1]))[1][-1] != cache.digests(["q12"], np.array([1]))[1][-1]


def test_a_replaced_item_vector_clears_the_cache(bundle):
    student, _, cache = one_student(bundle, seed=5, targets=1, entries=10)
    student.answer(4)
    cache.state(bundle, student.ids, *student.arrays())
    cache.invalidate_on(0)
    assert len(cache) == 1
    cache.invalidate_on(1)
    assert len(cache) == 0


def old_version(exported, root):
    """The exported kt version as exported before the cache: no kt_step.onnx, re-checksummed so it loads."""
    directory = root / VERSION
    shutil.copytree(exported / VERSION, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("files")
    manifest["kt_parts"].pop("step")
    (directory / KT_STEP_FILE).unlink()
    write_manifest(directory, manifest)
    return root


def serve(artifacts, tmp_path, **overrides) -> TestClient:
    settings = ServiceSettings(
        artifacts_dir=artifacts, embedded_store_path=tmp_path / "store.sqlite3", redis_url=None, tasks=["kt"],
        model_poll_interval_s=0, bootstrap=False, follow_activations=False, **overrides,
    )  # fmt: skip
    return TestClient(create_app(settings))


@pytest.mark.parametrize("layout", ["current", "old"])
def test_the_service_answers_as_the_whole_head_with_and_without_the_cache(exported_artifacts, tmp_path, layout):
    artifacts = exported_artifacts if layout == "current" else old_version(exported_artifacts, tmp_path / "old")
    bundle = ModelBundle.load(artifacts, VERSION, providers=CPU)
    assert bundle.kt_continues == (layout == "current")
    vectors = dict(zip(*bundle.item_embeddings(), strict=True))
    rng = np.random.default_rng(6)
    history: list[dict] = []
    targets = ITEMS[:5]
    with serve(artifacts, tmp_path) as client:
        for _ in range(6):
            history.append({"item_id": ITEMS[int(rng.integers(0, 12))], "correct": bool(rng.integers(0, 2))})
            response = client.post("/predict", json={"task": "kt", "history": history, "targets": targets})
            assert response.status_code == 200, response.text
            got = [p["probability"] for p in response.json()["predictions"]]
            expected = bundle.predict_kt(
                np.stack([vectors[a["item_id"]] for a in history]),
                np.array([a["correct"] for a in history]),
                np.stack([vectors[i] for i in targets]),
            )
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        body = {"task": "kt", "history": history, "k": 3}
        assert client.post("/recommend", json=body).status_code == 200
        cache = client.app.state.registry.get("kt").kt_cache  # type: ignore[attr-defined]
        if layout == "old":
            assert cache is None
        else:
            assert (cache.misses, cache.hits) == (1, 6)  # the first request, then a step each and /recommend's hit
        metrics = client.get("/metrics").text
        exported = [line for line in metrics.splitlines() if line.startswith("gramrec_kt_cache_")]
        if layout == "old":
            assert exported == []
        else:
            labels = f'{{version="{VERSION}"}}'
            assert f"gramrec_kt_cache_hits_total{labels} 6.0" in exported
            assert f"gramrec_kt_cache_misses_total{labels} 1.0" in exported
            assert f"gramrec_kt_cache_entries{labels} {float(len(cache))}" in exported


def test_a_zero_setting_serves_without_a_cache(exported_artifacts, tmp_path):
    with serve(exported_artifacts, tmp_path, kt_cache_entries=0) as client:
        assert client.app.state.registry.get("kt").kt_cache is None  # type: ignore[attr-defined]
        body = {"task": "kt", "history": [{"item_id": ITEMS[1], "correct": True}], "targets": ITEMS[:2]}
        assert client.post("/predict", json=body).status_code == 200


def test_the_setting_is_validated(monkeypatch):
    monkeypatch.setenv("GRAMREC_KT_CACHE_ENTRIES", "250")
    assert ServiceSettings().kt_cache_entries == 250
    for bad in ("-1", "many", "10000001"):
        monkeypatch.setenv("GRAMREC_KT_CACHE_ENTRIES", bad)
        with pytest.raises(ValidationError, match="kt_cache_entries"):
            ServiceSettings()
    with pytest.raises(ValueError, match="entries"):
        KTStateCache(VERSION, 0)


def test_inline_texts_skip_the_cache_and_a_replaced_item_is_never_served_stale(exported_artifacts, tmp_path):
    bundle = ModelBundle.load(exported_artifacts, VERSION, providers=CPU)
    vectors = dict(zip(*bundle.item_embeddings(), strict=True))
    history = [{"item_id": ITEMS[i], "correct": i % 2 == 0} for i in (1, 2, 3)]
    body = {"task": "kt", "history": history, "targets": ITEMS[4:6]}

    def expected() -> list[float]:
        steps = np.stack([vectors[a["item_id"]] for a in history])
        correct = np.array([a["correct"] for a in history])
        return bundle.predict_kt(steps, correct, np.stack([vectors[i] for i in ITEMS[4:6]])).tolist()

    with serve(exported_artifacts, tmp_path) as client:
        cache = client.app.state.registry.get("kt").kt_cache  # type: ignore[attr-defined]
        assert client.post("/predict", json=body).status_code == 200
        assert (cache.misses, len(cache)) == (1, 1)
        inline = {"task": "kt", "history": [*history, {"item_id": "kt-inline", "correct": True}], "targets": ITEMS[4:6]}
        inline["items"] = [{"item_id": "kt-inline", "text": "Sum the digits of a number."}]
        assert client.post("/predict", json=inline).status_code == 200
        assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)  # encoded for that request only: not cached

        text = "Print the largest of three integers."  # kt-item-2's vector replaced through the API
        assert (
            client.post("/items", json={"task": "kt", "items": [{"item_id": ITEMS[2], "text": text}]}).status_code
            == 200
        )
        vectors[ITEMS[2]] = bundle.encode_texts([text])[0]
        response = client.post("/predict", json=body)
        assert response.status_code == 200
        got = [p["probability"] for p in response.json()["predictions"]]
        np.testing.assert_allclose(got, expected(), rtol=0, atol=1e-5)  # not the state of the old vector
        assert (cache.hits, cache.misses) == (0, 2)
