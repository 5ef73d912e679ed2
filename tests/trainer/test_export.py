"""ONNX export and the serving bundle: parity with PyTorch, integrity checks, immutability, path safety."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gramrec.models.content_encoder import (
    ContentEncoder,
    default_encoder_dir,
    load_tokenizer,
)
from gramrec.models.heads import build_head
from gramrec.service import bundle as bundle_module
from gramrec.service.artifact import ArtifactError, list_versions
from gramrec.service.bundle import ModelBundle
from gramrec.trainer.checkpoint import (
    CheckpointMeta,
    load_trained_model,
    save_checkpoint,
)
from gramrec.trainer.export import ExportError, export_checkpoint
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.settings import TrainSettings

TEXTS = [
    "Write a function that returns the sum of the even numbers in an array.",
    "Stocks rally as the central bank holds interest rates steady",
    "Loops",
    "",
    "A very long item text that goes on and on " * 20,
    "Recursion: count the number of times the letter x appears in a string.",
]
TOLERANCE = 1e-4


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected|, relative to the magnitude of expected (never below 1)."""
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def make_checkpoint(path: Path, encoder_dir: Path, task: str, pooling: str, strategy: str = "gram") -> Path:
    """A saved checkpoint with random head weights (start state included, so it is not trivially zero)."""
    settings = TrainSettings(
        task=task, data=Path("data/tiny-set"), strategy=strategy, pooling=pooling, hidden_dim=16, max_tokens=16
    )
    torch.manual_seed(1)
    encoder = ContentEncoder.from_pretrained(encoder_dir, pooling=pooling).float()
    head = build_head(task, encoder.dim, hidden_dim=16)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    metadata = [{"category": f"c{i % 2}"} for i in range(len(TEXTS))] if task == "nr" else None
    items = ItemCatalog(ids=[f"item-{i}" for i in range(len(TEXTS))], texts=TEXTS, metadata=metadata)
    strategy_tensors = {"id_embedding": torch.randn(len(TEXTS), encoder.dim)} if strategy == "nocontent" else {}
    meta = CheckpointMeta(
        settings=json.loads(settings.model_dump_json()), epoch=0, global_step=1, best_metric=0.7,
        val_metrics={"auc": 0.7},
    )
    save_checkpoint(path, meta, encoder, load_tokenizer(encoder_dir), head, items, strategy_tensors)
    return path


VARIANTS = {
    "kt-mean": ("kt", "mean", "gram"),
    "kt-attention": ("kt", "attention", "e2e"),
    "nr-mean": ("nr", "mean", "nofinetune"),
    "nr-attention": ("nr", "attention", "gram"),
    "kt-nocontent": ("kt", "mean", "nocontent"),
    "nr-nocontent": ("nr", "attention", "nocontent"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_encoder_dir) -> dict[str, tuple[Path, Path]]:
    """Every variant: (checkpoint, artifact version directory), all under one artifacts root."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for name, (task, pooling, strategy) in VARIANTS.items():
        checkpoint = make_checkpoint(base / "checkpoints" / name, tiny_encoder_dir, task, pooling, strategy)
        out[name] = (checkpoint, export_checkpoint(checkpoint, base / "artifacts", progress=False))
    return out


def load(artifact: Path) -> ModelBundle:
    return ModelBundle.load(artifact.parent, artifact.name, providers=["CPUExecutionProvider"])


def padded_tokens(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [batch, length] and a mask whose rows have different lengths (row 0 is full)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1000, 30522, (batch, length), dtype=np.int64)
    lengths = np.concatenate([[length], rng.integers(1, length + 1, batch - 1)])
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask


# -- layout and manifest ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kt-mean", "nr-attention"])
def test_manifest_describes_and_checksums_every_file(exported, name):
    checkpoint, artifact = exported[name]
    manifest = json.loads((artifact / "manifest.json").read_text())
    task, pooling, strategy = VARIANTS[name]
    assert manifest["format"] == "gramrec-artifact/1"
    assert manifest["version"] == artifact.name and artifact.name.startswith(f"{task}-")
    assert (manifest["task"], manifest["strategy"], manifest["pooling"]) == (task, strategy, pooling)
    assert (manifest["dim"], manifest["max_tokens"]) == (32, 16)
    assert manifest["metrics"] == {"auc": 0.7}
    assert manifest["data_fingerprint"].startswith("sha256:")
    assert manifest["source_checkpoint"] == str(checkpoint.resolve())
    assert manifest["created"].endswith("Z")
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"encoder.onnx", "head.onnx", "items.safetensors", "items.json", "tokenizer/tokenizer.json"} <= on_disk
    for entry in manifest["files"].values():
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in [artifact, *artifact.rglob("*")])  # readable by the service
    assert max(manifest["onnx"]["parity"].values()) < TOLERANCE


@pytest.mark.parametrize("name", ["kt-mean", "nr-attention"])
def test_item_metadata_travels_from_the_checkpoint_to_the_bundle(exported, name):
    _, artifact = exported[name]
    metadata = load(artifact).item_metadata()
    if name.startswith("nr"):
        assert metadata == [{"category": f"c{i % 2}"} for i in range(len(TEXTS))]
    else:
        assert metadata is None


def test_explicit_metrics_and_fingerprint_are_recorded(exported, tmp_path):
    checkpoint, _ = exported["kt-mean"]
    artifact = export_checkpoint(
        checkpoint, tmp_path, version="kt-v1.0", metrics={"auc": 0.81}, data_fingerprint="sha256:abc", progress=False
    )
    manifest = load(artifact).manifest
    assert manifest["version"] == "kt-v1.0"
    assert (manifest["metrics"], manifest["data_fingerprint"]) == ({"auc": 0.81}, "sha256:abc")


# -- parity with PyTorch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kt-mean", "kt-attention", "nr-mean", "nr-attention"])
def test_encoder_matches_pytorch_on_new_shapes(exported, name):
    import onnxruntime as ort

    checkpoint, artifact = exported[name]
    encoder = load_trained_model(checkpoint).encoder
    session = ort.InferenceSession(str(artifact / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch, length in [(5, 13), (1, 3), (3, 16)]:  # exported with batch 2, sequence 7
        input_ids, attention_mask = padded_tokens(batch, length, seed=batch)
        got = session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        with torch.no_grad():
            expected = encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
        assert got.shape == (batch, 32)
        assert relative_error(got, expected) < TOLERANCE


@pytest.mark.parametrize("name", ["kt-mean", "nr-attention"])
def test_encode_texts_matches_pytorch_encoder_and_item_table(exported, name):
    checkpoint, artifact = exported[name]
    model = load_trained_model(checkpoint)
    bundle = load(artifact)
    encoded = model.tokenizer(TEXTS, truncation=True, max_length=16, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model.encoder(encoded["input_ids"], encoded["attention_mask"]).numpy()
    assert relative_error(bundle.encode_texts(TEXTS), expected) < TOLERANCE
    assert relative_error(bundle.encode_texts([TEXTS[4]]), expected[4:5]) < TOLERANCE  # truncated to 16
    assert bundle.encode_texts([]).shape == (0, 32)
    ids, table = bundle.item_embeddings()
    assert ids == model.items.ids and table.dtype == np.float32
    assert relative_error(table, expected) < TOLERANCE


def test_bundle_tokenizer_matches_hugging_face(exported):
    checkpoint, artifact = exported["kt-mean"]
    reference = load_trained_model(checkpoint).tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]
    tokenizer = load(artifact)._tokenizer
    assert [e.ids[: sum(e.attention_mask)] for e in tokenizer.encode_batch(TEXTS)] == reference


@pytest.mark.parametrize("name", ["kt-mean", "kt-attention"])
def test_knowledge_tracing_head_matches_pytorch(exported, name):
    checkpoint, artifact = exported[name]
    head = load_trained_model(checkpoint).head
    bundle = load(artifact)
    rng = np.random.default_rng(0)
    for batch, steps, k in [(5, 13, 4), (1, 3, 1), (3, 100, 10)]:  # exported with B=2, T=7, K=3
        history = rng.normal(size=(batch, steps, 32)).astype(np.float32)
        correct = rng.integers(0, 2, (batch, steps), dtype=np.int64)
        lengths = np.concatenate([[steps], rng.integers(0, steps + 1, batch - 1)])
        mask = np.arange(steps)[None, :] < lengths[:, None]
        targets = rng.normal(size=(batch, k, 32)).astype(np.float32)
        feed = {"history": history, "history_correct": correct, "history_mask": mask, "targets": targets}
        got = bundle._head.run(["logits"], feed)[0]
        with torch.no_grad():
            expected = head.predict_next(*(torch.from_numpy(a) for a in feed.values())).numpy()
        assert got.shape == (batch, k)
        assert relative_error(got, expected) < TOLERANCE
        probabilities = bundle.predict_kt(history[0], correct[0], targets[0])
        assert relative_error(probabilities, torch.sigmoid(torch.from_numpy(expected[0])).numpy()) < TOLERANCE


def test_knowledge_tracing_empty_history_uses_the_start_state(exported):
    checkpoint, artifact = exported["kt-mean"]
    head = load_trained_model(checkpoint).head
    targets = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    got = load(artifact).predict_kt(np.zeros((0, 32), np.float32), np.zeros(0, np.int64), targets)
    with torch.no_grad():  # forward()'s logit at t = 0 is the start-state prediction
        first_answer = head(torch.from_numpy(targets)[:, None, :], torch.zeros(3, 1, dtype=torch.long))[:, 0]
    assert got.shape == (3,)
    assert relative_error(got, torch.sigmoid(first_answer).numpy()) < TOLERANCE


@pytest.mark.parametrize("name", ["nr-mean", "nr-attention"])
def test_news_head_matches_pytorch(exported, name):
    checkpoint, artifact = exported[name]
    head = load_trained_model(checkpoint).head
    bundle = load(artifact)
    rng = np.random.default_rng(0)
    for batch, clicks, c in [(5, 13, 4), (1, 3, 1), (2, 50, 20)]:  # exported with B=2, L=7, C=3
        history = rng.normal(size=(batch, clicks, 32)).astype(np.float32)
        lengths = np.concatenate([[clicks], rng.integers(0, clicks + 1, batch - 1)])
        mask = np.arange(clicks)[None, :] < lengths[:, None]
        candidates = rng.normal(size=(batch, c, 32)).astype(np.float32)
        feed = {"history": history, "history_mask": mask, "candidates": candidates}
        got = bundle._head.run(["scores"], feed)[0]
        with torch.no_grad():
            expected = head(*(torch.from_numpy(a) for a in feed.values())).numpy()
        assert got.shape == (batch, c)
        assert relative_error(got, expected) < TOLERANCE
        assert relative_error(bundle.score_news(history[0], candidates[0]), expected[0]) < TOLERANCE
    empty = bundle.score_news(np.zeros((0, 32), np.float32), candidates[0])
    assert np.array_equal(empty, np.zeros(20, np.float32))


def test_wrong_task_and_bad_shapes_are_refused(exported):
    kt, nr = load(exported["kt-mean"][1]), load(exported["nr-mean"][1])
    with pytest.raises(ArtifactError, match="'kt' model"):
        kt.score_news(np.zeros((1, 32)), np.zeros((1, 32)))
    with pytest.raises(ArtifactError, match="'nr' model"):
        nr.predict_kt(np.zeros((1, 32)), np.zeros(1), np.zeros((1, 32)))
    with pytest.raises(ValueError, match="targets"):
        kt.predict_kt(np.zeros((1, 32)), np.zeros(1), np.zeros((1, 31)))
    with pytest.raises(ValueError, match="history_correct"):
        kt.predict_kt(np.zeros((2, 32)), np.zeros(1), np.zeros((1, 32)))
    kt.warm_up()
    nr.warm_up()


# -- nocontent ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kt-nocontent", "nr-nocontent"])
def test_nocontent_has_no_encoder(exported, name):
    checkpoint, artifact = exported[name]
    assert not (artifact / "encoder.onnx").exists() and not (artifact / "tokenizer").exists()
    bundle = load(artifact)
    assert bundle.manifest["encoder"] is None and not bundle.has_encoder
    with pytest.raises(ArtifactError, match="no content encoder"):
        bundle.encode_texts(["anything"])
    ids, table = bundle.item_embeddings()
    expected = load_trained_model(checkpoint).strategy_tensors["id_embedding"].numpy()
    assert ids == [f"item-{i}" for i in range(len(TEXTS))] and np.array_equal(table, expected)
    bundle.warm_up()


# -- integrity and immutability -----------------------------------------------------------------------------
@pytest.fixture
def artifact_copy(exported, tmp_path) -> Path:
    """A private copy of the kt-mean artifact, safe to tamper with."""
    source = exported["kt-mean"][1]
    return Path(shutil.copytree(source, tmp_path / "artifacts" / source.name))


@pytest.fixture
def no_sessions(monkeypatch) -> list:
    """Records any attempt to create an ONNX Runtime session (none may happen for a rejected artifact)."""
    created = []
    monkeypatch.setattr(bundle_module.ort, "InferenceSession", lambda *a, **k: created.append(a) or 1 / 0)
    return created


@pytest.mark.parametrize("victim", ["head.onnx", "encoder.onnx", "items.safetensors", "tokenizer/tokenizer.json"])
def test_tampered_file_is_rejected_before_any_session(artifact_copy, no_sessions, victim):
    path = artifact_copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{victim}.*checksum mismatch"):
        load(artifact_copy)
    assert no_sessions == []


def test_missing_and_unlisted_files_are_rejected(artifact_copy, no_sessions):
    (artifact_copy / "extra.onnx").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="not listed"):
        load(artifact_copy)
    (artifact_copy / "extra.onnx").unlink()
    (artifact_copy / "head.onnx").unlink()
    with pytest.raises(ArtifactError, match="head.onnx.*missing"):
        load(artifact_copy)
    assert no_sessions == []


def test_manifest_cannot_point_outside_the_version(artifact_copy, no_sessions):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["files"]["../escape.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unsafe file name"):
        load(artifact_copy)
    assert no_sessions == []


@pytest.mark.parametrize("version", ["../x", "kt-../../etc", "/etc/passwd", "kt-..", "kt-a/b", "", "KT-x", "kt-"])
def test_path_traversal_versions_are_rejected(exported, version):
    with pytest.raises(ArtifactError, match="invalid version"):
        ModelBundle.load(exported["kt-mean"][1].parent, version)


def test_absolute_artifact_path_as_version_is_rejected(exported):
    artifact = exported["kt-mean"][1]
    with pytest.raises(ArtifactError, match="invalid version"):
        ModelBundle.load(artifact.parent, str(artifact))


def test_symlink_escaping_the_root_is_rejected(exported, tmp_path, no_sessions):
    outside = Path(shutil.copytree(exported["kt-mean"][1], tmp_path / "outside" / "kt-evil"))
    root = tmp_path / "root"
    root.mkdir()
    (root / "kt-evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="not a version directory"):
        ModelBundle.load(root, "kt-evil")
    assert list_versions(root) == []
    assert no_sessions == []


def test_symlinked_file_inside_a_version_is_rejected(artifact_copy, tmp_path, no_sessions):
    target = tmp_path / "head-elsewhere.onnx"
    shutil.move(artifact_copy / "head.onnx", target)
    (artifact_copy / "head.onnx").symlink_to(target)
    with pytest.raises(ArtifactError, match="symlink"):
        load(artifact_copy)
    assert no_sessions == []


def test_export_refuses_to_overwrite_a_version(exported):
    checkpoint, artifact = exported["kt-mean"]
    before = (artifact / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(checkpoint, artifact.parent, version=artifact.name, progress=False)
    assert (artifact / "manifest.json").read_bytes() == before
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # temp dir cleaned up


@pytest.mark.parametrize("version", ["../kt-x", "kt-a/../b", "nr-for-a-kt-model", "kt-..", "kt-" + "x" * 65])
def test_export_rejects_bad_version_names(exported, tmp_path, version):
    with pytest.raises(ExportError):
        export_checkpoint(exported["kt-mean"][0], tmp_path, version=version, progress=False)
    assert not any(tmp_path.iterdir())


def test_list_versions_newest_first_and_skips_invalid(exported, tmp_path):
    root = tmp_path / "artifacts"
    for name, created in [("kt-old", "2024-01-01T00:00:00Z"), ("kt-new", "2025-01-01T00:00:00Z")]:
        copy = Path(shutil.copytree(exported["kt-mean"][1], root / name))
        manifest = json.loads((copy / "manifest.json").read_text()) | {"version": name, "created": created}
        (copy / "manifest.json").write_text(json.dumps(manifest))
    (root / "kt-broken").mkdir()
    (root / ".kt-partial.tmp").mkdir()
    assert [m["version"] for m in list_versions(root)] == ["kt-new", "kt-old"]
    assert list_versions(tmp_path / "missing") == []


def test_cli_export_prints_the_version_directory(exported, tmp_path, capsys):
    from gramrec.trainer.cli import main

    main(["export", str(exported["nr-mean"][0]), "--out", str(tmp_path), "--version", "nr-cli"])
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["path"]) == tmp_path / "nr-cli" and printed["version"] == "nr-cli"
    assert load(tmp_path / "nr-cli").version == "nr-cli"


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------
def test_real_minilm_export_matches_pytorch(tmp_path):
    started = time.perf_counter()
    settings = TrainSettings(task="nr", data=Path("mind"), strategy="gram", hidden_dim=16)
    encoder = ContentEncoder.from_pretrained(default_encoder_dir(), pooling="attention")
    tokenizer = load_tokenizer(default_encoder_dir())
    texts = TEXTS[:3]
    items = ItemCatalog(ids=["N1", "N2", "N3"], texts=texts)
    meta = CheckpointMeta(settings=json.loads(settings.model_dump_json()), epoch=0, global_step=0, best_metric=None)
    save_checkpoint(tmp_path / "ckpt", meta, encoder, tokenizer, build_head("nr", encoder.dim), items, {})
    artifact = export_checkpoint(tmp_path / "ckpt", tmp_path / "artifacts", progress=False)
    bundle = load(artifact)

    encoded = tokenizer(texts, truncation=True, max_length=32, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = encoder.eval()(encoded["input_ids"], encoded["attention_mask"]).numpy()
    assert bundle.dim == 384 and bundle.max_tokens == 32
    assert relative_error(bundle.encode_texts(texts), expected) < TOLERANCE
    assert relative_error(bundle.item_embeddings()[1], expected) < TOLERANCE
    assert time.perf_counter() - started < 60
