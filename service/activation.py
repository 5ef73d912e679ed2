"""Activating a model version: the one path the admin route, a retrain job and a first start all take.

load the bundle -> golden check -> item table ready in the store (loaded if missing, API-added items encoded) and
model warmed -> compare-and-set the task's active pointer (under the retrain lease, for a retrain) -> catch up
on items added meanwhile -> switch this process over (`on_switch`) -> publish the activation to other processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from gramrec.service.errors import GramrecError
from gramrec.service.store import Lease, Store
from gramrec.service.store.items import text_digest

log = logging.getLogger("gramrec.service")

BACKFILL_BATCH = 64


class Bundle(Protocol):
    """The part of service.bundle.ModelBundle the API uses."""

    version: str
    task: str
    strategy: str
    dim: int
    max_tokens: int
    manifest: dict
    has_encoder: bool

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...
    def predict_kt(self, history: np.ndarray, history_correct: np.ndarray, targets: np.ndarray) -> np.ndarray: ...
    def kt_state(self, history: np.ndarray, history_correct: np.ndarray) -> np.ndarray: ...
    def kt_memory(self, history: np.ndarray, history_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def kt_continue(
        self, memory: np.ndarray, history: np.ndarray, history_correct: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def score_news(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...
    def item_embeddings(self) -> tuple[list[str], np.ndarray]: ...
    def item_metadata(self) -> list[dict] | None: ...
    def catalog_ids(self) -> Sequence[str]: ...
    def catalog_text(self, item_id: str) -> str | None: ...
    def warm_up(self) -> None: ...
    def self_check(self) -> None: ...


class VersionNotFound(GramrecError, LookupError):
    """No exported version of that name."""


class ActivationConflict(GramrecError, RuntimeError):
    """Another process changed the task's active version while this one was activating."""


def bundle_loader(providers: list[str] | None = None, threads: int | None = None) -> Callable[[Path, str], Bundle]:
    """Loads versions with service.bundle.ModelBundle (imported on first use: it brings onnxruntime)."""

    def load(root: Path, version: str) -> Bundle:
        from gramrec.service.bundle import ModelBundle

        return ModelBundle.load(root, version, providers=providers, intra_op_threads=threads)

    return load


def find_manifest(manifests: list[dict], version: str, artifacts_dir: Path) -> dict:
    for manifest in manifests:
        if manifest.get("version") == version:
            return manifest
    raise VersionNotFound(f"model version {version!r} not found in {artifacts_dir}")


def prepare(store: Store, bundle: Bundle, known_texts: Mapping[str, str] | None = None) -> None:
    """Loads the bundle's item table into the store if missing, adds API-added items, warms the model."""
    if not store.has_table(bundle.version):
        ids, vectors = bundle.item_embeddings()
        if store.load_table(bundle.version, ids, vectors, bundle.dim):
            log.info("item table loaded", extra={"version": bundle.version, "items": len(ids)})
    backfill(store, bundle, known_texts)
    bundle.warm_up()


def backfill(store: Store, bundle: Bundle, known_texts: Mapping[str, str] | None = None) -> None:
    """Encodes the items added through the API (texts hash) that this version's table lacks, and those whose
    current text differs from the text their row was encoded from, so a rollback to an older version serves no
    stale vector; rows whose text is unchanged are left alone."""
    if not bundle.has_encoder:
        return
    texts = store.texts(bundle.task)
    if not texts:
        return
    ordered = sorted(stale_rows(store, bundle, texts, known_texts))
    for start in range(0, len(ordered), BACKFILL_BATCH):
        ids = ordered[start : start + BACKFILL_BATCH]
        batch = [texts[i] for i in ids]
        store.add_vectors(bundle.version, ids, bundle.encode_texts(batch), bundle.dim, texts=batch)
    if ordered:
        log.info("items re-encoded", extra={"version": bundle.version, "items": len(ordered)})


def stale_rows(
    store: Store, bundle: Bundle, texts: Mapping[str, str], known_texts: Mapping[str, str] | None
) -> set[str]:
    """Ids of `texts` whose row in the version's table is missing or was encoded from another text.

    The text a row came from: the digest stored with it (rows written after the bulk load), else the texts the
    caller says the table was built from (a retrain's snapshot), else the version's own catalog text. A row with
    none of these (written before digests were kept) is re-encoded: its source is unknown.
    """
    present = store.table_ids(bundle.version)
    recorded = store.text_digests(bundle.version, [i for i in texts if i in present])
    stale = set()
    for item_id, text in texts.items():
        if item_id not in present:
            stale.add(item_id)
            continue
        made_from = recorded.get(item_id)
        if made_from is None:
            source = (known_texts or {}).get(item_id) or bundle.catalog_text(item_id)
            made_from = text_digest(source) if source is not None else None
        if made_from != text_digest(text):
            stale.add(item_id)
    return stale


_CURRENT = object()  # expected_active default: whatever the pointer names when the switch is attempted


def activate(
    store: Store,
    artifacts_dir: Path,
    version: str,
    *,
    load_bundle: Callable[[Path, str], Bundle],
    list_versions: Callable[[Path], list[dict]],
    lease: Lease | None = None,
    known_texts: Mapping[str, str] | None = None,
    expected_active: str | None | object = _CURRENT,
    on_prepared: Callable[[Bundle], object] | None = None,
    on_switch: Callable[[Bundle], object] | None = None,
) -> Bundle:
    """Makes `version` the active model of its task in the store (rollback, roll-forward, retrain, first start).

    lease: the retrain lock; the pointer moves only while it is held (else LeaseLost).
    known_texts: item id -> text the version's table was encoded from; items whose text changed since are
    re-encoded, before and after the pointer moves, so nothing added or updated during a retrain is lost.
    expected_active: the version the pointer must still name (a retrain's base); default: whatever it names now.
    on_prepared: called with the bundle once its table is ready, before the pointer moves (the registry builds
    its catalog index there, so a failure leaves the pointer where it was).
    on_switch: called with the bundle once the pointer names it, before the activation is published (the
    registry of the calling process swaps there).
    """
    find_manifest(list_versions(artifacts_dir), version, artifacts_dir)
    bundle = load_bundle(artifacts_dir, version)
    bundle.self_check()
    task = bundle.task
    prepare(store, bundle, known_texts)
    if on_prepared is not None:
        on_prepared(bundle)
    expected = store.active_version(task) if expected_active is _CURRENT else expected_active
    if expected != version and not store.compare_and_set_active(task, expected, version, lease):  # type: ignore[arg-type]
        raise ActivationConflict(f"the active {task} version changed during activation; try again")
    backfill(store, bundle, known_texts)  # items added or updated between prepare and the pointer switch
    if on_switch is not None:
        on_switch(bundle)
    store.publish_activation(task, version)
    return bundle
