"""Which model version serves each task, in this process and in the shared store.

A request takes one ActiveModel (bundle + version) at its start and uses it to the end, so swapping the active
version never mixes two models or two tables in one answer. Activation loads and warms the new bundle, makes sure
its item table is in the store, then compare-and-sets the task's pointer; only the winner swaps. Other processes
(uvicorn workers, replicas) follow the pointer with `sync`, run every few seconds by `start_polling`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.item_store import STORE_ERRORS, StaleVersion, Store

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
    def score_news(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...
    def item_embeddings(self) -> tuple[list[str], np.ndarray]: ...
    def warm_up(self) -> None: ...


class VersionNotFound(LookupError):
    pass


class ActivationConflict(RuntimeError):
    """Another process changed the task's active version while this one was activating."""


@dataclass(frozen=True)
class ActiveModel:
    task: str
    version: str
    bundle: Bundle


def _default_loader(providers: Sequence[str] | None, threads: int | None) -> Callable[[Path, str], Bundle]:
    def load(root: Path, version: str) -> Bundle:
        from service.bundle import ModelBundle

        return ModelBundle.load(
            root, version, providers=list(providers) if providers else None, intra_op_threads=threads
        )

    return load


def _default_lister(root: Path) -> list[dict]:
    from service.bundle import list_versions

    return list_versions(root)


class ModelRegistry:
    def __init__(
        self,
        store: Store,
        artifacts_dir: Path,
        tasks: Sequence[str],
        load_bundle: Callable[[Path, str], Bundle] | None = None,
        list_versions: Callable[[Path], list[dict]] | None = None,
        providers: Sequence[str] | None = None,
        ort_threads: int | None = None,
    ):
        self.store = store
        self.artifacts_dir = Path(artifacts_dir)
        self.tasks = list(tasks)
        self._load_bundle = load_bundle or _default_loader(providers, ort_threads)
        self._list_versions = list_versions or _default_lister
        self._active: dict[str, ActiveModel] = {}
        self._lock = threading.RLock()  # one activation at a time in this process
        self._broken: set[str] = set()  # versions that failed to load, reported once
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- reading (hot path: a dict lookup, no lock) -------------------------------------------------------------------
    def get(self, task: str) -> ActiveModel | None:
        return self._active.get(task)

    def active(self) -> dict[str, ActiveModel]:
        return dict(self._active)

    def versions(self) -> list[dict]:
        """Manifests of every exported version, newest first."""
        return self._list_versions(self.artifacts_dir)

    def manifest(self, version: str) -> dict:
        for manifest in self.versions():
            if manifest.get("version") == version:
                return manifest
        raise VersionNotFound(f"model version {version!r} not found in {self.artifacts_dir}")

    # -- activation ---------------------------------------------------------------------------------------------------
    def activate(self, version: str) -> ActiveModel:
        """Makes `version` the active model of its task, here and in the store (rollback and roll-forward)."""
        with self._lock:
            self.manifest(version)
            bundle = self._load_bundle(self.artifacts_dir, version)
            task = bundle.task
            self._prepare(bundle)
            expected = self.store.active_version(task)
            if expected != version and not self.store.compare_and_set_active(task, expected, version):
                raise ActivationConflict(f"the active {task} version changed during activation; try again")
            self._backfill(bundle)  # items added between _prepare and the pointer switch
            return self._swap(bundle)

    def sync(self, task: str) -> ActiveModel | None:
        """Follows the store's pointer for `task`; with no pointer yet, activates the newest exported version."""
        with self._lock:
            version = self.store.active_version(task)
            current = self._active.get(task)
            if version is None:
                return self._adopt_newest(task)
            if current is not None and current.version == version:
                if not self.store.has_table(version):  # flushed or evicted under us: load it again
                    log.warning("item table missing from the store; reloading", extra={"version": version})
                    self._prepare(current.bundle)
                return current
            if version in self._broken:
                return current
            try:
                bundle = self._load_bundle(self.artifacts_dir, version)
                self._prepare(bundle)
            except STORE_ERRORS:
                raise  # the store failed, not the version: the next poll tries again
            except Exception:
                self._broken.add(version)
                log.exception("cannot load the active version", extra={"task": task, "version": version})
                return current
            return self._swap(bundle)

    def _adopt_newest(self, task: str) -> ActiveModel | None:
        """With no active pointer yet: the newest exported version of `task` that loads.

        A version that does not load (corrupt, tampered) is logged and skipped for the next newest, so one bad
        export cannot keep a fresh deployment from starting.
        """
        for manifest in self.versions():
            version = manifest["version"]
            if manifest.get("task") != task or version in self._broken:
                continue
            log.info("adopting newest version", extra={"task": task, "version": version})
            try:
                return self.activate(version)
            except ActivationConflict:
                return self.sync(task)  # another process won; follow it
            except STORE_ERRORS:
                raise
            except Exception as exc:
                self._broken.add(version)
                log.error("cannot load version; trying an older one", extra={"version": version, "error": repr(exc)})
        return None

    def start(self) -> None:
        """Loads each task's model. A store that is down does not stop the process: it starts unready (503s)
        and the poll loads the models once the store answers, so an API started before Redis needs no restart."""
        for task in self.tasks:
            try:
                model = self.sync(task)
            except STORE_ERRORS as exc:
                log.warning("item store unreachable at start; the model poll retries", extra={"error": repr(exc)})
                continue
            if model is None:
                log.warning("no model for task; its predictions answer 503", extra={"task": task})

    def start_polling(self, interval_s: float) -> None:
        if interval_s <= 0 or self._poller is not None:
            return

        def poll() -> None:
            while not self._stop.wait(interval_s):
                for task in self.tasks:
                    try:
                        self.sync(task)
                    except STORE_ERRORS as exc:  # an outage: one line per poll, not a traceback
                        log.warning("model poll: item store unreachable", extra={"task": task, "error": repr(exc)})
                    except Exception:
                        log.exception("model poll failed", extra={"task": task})

        self._poller = threading.Thread(target=poll, name="gramrec-model-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    # -- internals ----------------------------------------------------------------------------------------------------
    def _prepare(self, bundle: Bundle) -> None:
        """Loads the bundle's item table into the store if missing, adds API-added items, warms the model."""
        if not self.store.has_table(bundle.version):
            ids, vectors = bundle.item_embeddings()
            if self.store.load_table(bundle.version, ids, vectors, bundle.dim):
                log.info("item table loaded", extra={"version": bundle.version, "items": len(ids)})
        self._backfill(bundle)
        bundle.warm_up()

    def _backfill(self, bundle: Bundle) -> None:
        """Encodes items added through the API (texts hash) that this version's table lacks."""
        if not bundle.has_encoder:
            return
        texts = self.store.texts(bundle.task)
        if not texts:
            return
        missing = sorted(set(texts) - self.store.table_ids(bundle.version))
        for start in range(0, len(missing), BACKFILL_BATCH):
            ids = missing[start : start + BACKFILL_BATCH]
            vectors = bundle.encode_texts([texts[i] for i in ids])
            self.store.add_vectors(bundle.version, ids, vectors, bundle.dim)
        if missing:
            log.info("items re-encoded", extra={"version": bundle.version, "items": len(missing)})

    def _swap(self, bundle: Bundle) -> ActiveModel:
        model = ActiveModel(task=bundle.task, version=bundle.version, bundle=bundle)
        self._active[bundle.task] = model
        self._broken.discard(bundle.version)
        log.info("model active", extra={"task": bundle.task, "version": bundle.version})
        return model

    def refresh_after_stale(self, task: str, error: StaleVersion) -> ActiveModel | None:
        """A write found the pointer moved: follow it, so a retry uses the new version."""
        log.info("active version moved; following", extra={"task": task, "reason": str(error)})
        return self.sync(task)
