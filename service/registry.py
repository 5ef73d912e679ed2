"""Which model version serves each task, in this process and in the shared store.

A request takes one ActiveModel (bundle + version) at its start and uses it to the end, so swapping the active
version never mixes two models or two tables in one answer. Activation loads the new bundle, checks it on its
golden request, warms it, makes sure its item table is in the store (catching up on items added through the API),
then compare-and-sets the task's pointer, catches up again, and publishes the change; only the winner swaps.
Other processes (uvicorn workers, replicas) follow the pointer with `sync`: at once on a published activation
(pub/sub, `start_following`), and every few seconds by polling, which also covers a lost message.

A version that fails to load or to pass its check is remembered as broken: the old bundle keeps serving, and the
error shows in `load_errors()` (/readyz detail, /metrics) until a later version loads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gramrec.service.activation import (
    _CURRENT,
    ActivationConflict,
    Bundle,
    VersionNotFound,
    activate,
    bundle_loader,
    find_manifest,
    prepare,
)
from gramrec.service.artifact import list_versions as artifact_list_versions
from gramrec.service.catalog import CatalogIndex
from gramrec.service.kt_cache import KTStateCache
from gramrec.service.store import STORE_ERRORS, Lease, StaleVersion, Store

if TYPE_CHECKING:
    from gramrec.service.settings import ServiceSettings

__all__ = ["ActivationConflict", "ActiveModel", "Bundle", "ModelRegistry", "VersionNotFound"]

log = logging.getLogger("gramrec.service")


@dataclass(frozen=True)
class ActiveModel:
    task: str
    version: str
    bundle: Bundle
    index: CatalogIndex | None = None  # the version's whole catalog, for POST /recommend
    kt_cache: KTStateCache | None = None  # kt versions with kt_step.onnx: the per-student LSTM state cache


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
        index_max_bytes: int = 2 << 30,
        index_ann_threshold: int = 20_000,
        kt_cache_entries: int = 0,
    ):
        self.store = store
        self.artifacts_dir = Path(artifacts_dir)
        self.tasks = list(tasks)
        self._load_bundle = load_bundle or bundle_loader(list(providers) if providers else None, ort_threads)
        self._list_versions = list_versions or artifact_list_versions
        self._active: dict[str, ActiveModel] = {}
        self._lock = threading.RLock()  # one activation at a time in this process
        self._broken: dict[str, str] = {}  # version -> why it failed to load; not retried
        self._load_errors: dict[str, dict] = {}  # task -> {version, error} of its latest failed load
        self.load_failures = 0  # counter, for /metrics
        self.swaps = 0  # counter, for /metrics
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.index_max_bytes = index_max_bytes
        self.index_ann_threshold = index_ann_threshold
        self.kt_cache_entries = kt_cache_entries  # 0: no per-student state cache
        self._built: dict[str, CatalogIndex] = {}  # version -> index built before its swap
        self._index_errors = 0  # consecutive failed catch-ups (logged once per outage)

    @classmethod
    def from_settings(
        cls, store: Store, settings: ServiceSettings, tasks: Sequence[str] | None = None, **injected
    ) -> ModelRegistry:
        """The registry a service's settings describe (ONNX threads, catalog-index caps, kt state cache), for
        `tasks` (default: the settings'); `injected` replaces loaders (tests). One place, so a process that activates
        a version outside the app (benches, test deployments) builds it the way the app does."""
        return cls(
            store,
            settings.artifacts_dir,
            settings.tasks if tasks is None else tasks,
            ort_threads=settings.ort_threads,
            index_max_bytes=settings.index_max_bytes,
            index_ann_threshold=settings.index_ann_threshold,
            kt_cache_entries=settings.kt_cache_entries,
            **injected,
        )

    # -- reading (hot path: a dict lookup, no lock) -------------------------------------------------------------------
    def get(self, task: str) -> ActiveModel | None:
        return self._active.get(task)

    def active(self) -> dict[str, ActiveModel]:
        return dict(self._active)

    def load_errors(self) -> dict[str, dict]:
        """task -> {version, error} for tasks whose newest version failed to load (the old one still serves)."""
        return dict(self._load_errors)

    def versions(self) -> list[dict]:
        """Manifests of every exported version, newest first."""
        return self._list_versions(self.artifacts_dir)

    def manifest(self, version: str) -> dict:
        return find_manifest(self.versions(), version, self.artifacts_dir)

    # -- activation ---------------------------------------------------------------------------------------------------
    def activate(
        self,
        version: str,
        lease: Lease | None = None,
        known_texts: Mapping[str, str] | None = None,
        expected_active: str | None | object = _CURRENT,
    ) -> ActiveModel:
        """Makes `version` the active model of its task, here and in the store (service.activation.activate)."""
        with self._lock:
            bundle = activate(
                self.store,
                self.artifacts_dir,
                version,
                load_bundle=self._load_bundle,
                list_versions=self._list_versions,
                lease=lease,
                known_texts=known_texts,
                expected_active=expected_active,
                on_prepared=self._build_index,
                on_switch=self._swap,
            )
            return self._active[bundle.task]

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
                    prepare(self.store, current.bundle)
                return current
            if version in self._broken:
                return current
            try:
                bundle = self._load_bundle(self.artifacts_dir, version)
                bundle.self_check()
            except Exception as exc:  # the artifact itself is bad: not retried until another version is active
                self._broken[version] = str(exc)
                return self._failed(task, version, exc, current)
            try:
                prepare(self.store, bundle)
                self._build_index(bundle)
            except Exception as exc:  # the store is away (or the catalog too large): retried at the next poll
                return self._failed(task, version, exc, current)
            return self._swap(bundle)

    def _failed(self, task: str, version: str, exc: Exception, current: ActiveModel | None) -> ActiveModel | None:
        self._load_errors[task] = {"version": version, "error": str(exc)}
        self.load_failures += 1
        log.error(
            "cannot load the active version; the previous one keeps serving",
            extra={"task": task, "version": version, "error": str(exc)},
        )
        return current

    def _adopt_newest(self, task: str) -> ActiveModel | None:
        """With no active pointer yet: the newest exported version of `task` that loads.

        A version that does not load (corrupt, tampered, failing its check) is remembered as broken and skipped
        for the next newest, so one bad export cannot keep a fresh deployment from starting.
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
                raise  # the store, not the version: the next poll tries again
            except Exception as exc:
                self._broken[version] = str(exc)
                self._failed(task, version, exc, None)
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
        """Follows the pointers every interval_s (a fallback for lost messages and stores without pub/sub)."""
        if interval_s <= 0:
            return

        def poll() -> None:
            while not self._stop.wait(interval_s):
                self._sync_all()

        self._start_thread("gramrec-model-poll", poll)

    def start_index_refresh(self, interval_s: float) -> None:
        """Adds items written by other processes (the store's change log) to the active indexes every interval_s."""

        def refresh() -> None:
            while not self._stop.wait(interval_s):
                self.refresh_indexes()

        self._start_thread("gramrec-index-refresh", refresh)

    def refresh_indexes(self) -> None:
        for model in list(self._active.values()):
            if model.index is None:
                continue
            try:
                model.index.catch_up(self.store)
                self._index_errors = 0
            except STORE_ERRORS as exc:
                self._index_errors += 1
                if self._index_errors == 1:
                    log.warning("catalog index: item store unreachable", extra={"error": repr(exc)})
            except Exception:
                log.exception("catalog index refresh failed", extra={"task": model.task})

    def start_following(self, retry_s: float = 1.0) -> None:
        """Swaps as soon as an activation is published; re-subscribes after a broken connection."""

        def on_activation(task: str, _version: str) -> None:
            if task in self.tasks:
                self._sync_task(task)

        def follow() -> None:
            while not self._stop.is_set():
                try:
                    self.store.listen_activations(on_activation, self._stop)
                except STORE_ERRORS as exc:  # an outage: one line per retry, not a traceback
                    log.warning("activation feed lost; polling until it is back", extra={"error": repr(exc)})
                except Exception:
                    log.exception("activation feed failed; polling until it is back")
                self._stop.wait(retry_s)
                self._sync_all()  # whatever was published while the feed was down

        self._start_thread("gramrec-model-follow", follow)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _sync_all(self) -> None:
        for task in self.tasks:
            self._sync_task(task)

    def _sync_task(self, task: str) -> None:
        try:
            self.sync(task)
        except STORE_ERRORS as exc:  # an outage: one line per poll, not a traceback
            log.warning("model sync: item store unreachable", extra={"task": task, "error": repr(exc)})
        except Exception:
            log.exception("model sync failed", extra={"task": task})

    # -- internals ----------------------------------------------------------------------------------------------------
    def _build_index(self, bundle: Bundle) -> None:
        """The version's catalog index, built before the version is swapped in (no request sees a mixed one)."""
        self._built[bundle.version] = CatalogIndex.build(
            self.store, bundle, max_bytes=self.index_max_bytes, ann_threshold=self.index_ann_threshold
        )

    def _swap(self, bundle: Bundle) -> ActiveModel:
        index = self._built.pop(bundle.version, None)
        self._built.clear()  # indexes of versions that lost their activation: not needed
        if index is None:
            self._build_index(bundle)
            index = self._built.pop(bundle.version)
        try:
            index.catch_up(self.store)  # items added (and backfilled) between the build and the switch
        except STORE_ERRORS:
            pass  # the refresh thread catches up once the store answers
        cache = None
        if self.kt_cache_entries and getattr(bundle, "kt_continues", False):  # a fresh cache per swap
            cache = KTStateCache(bundle.version, self.kt_cache_entries)
        model = ActiveModel(task=bundle.task, version=bundle.version, bundle=bundle, index=index, kt_cache=cache)
        self._active[bundle.task] = model
        self._broken.pop(bundle.version, None)
        self._load_errors.pop(bundle.task, None)
        self.swaps += 1
        log.info("model active", extra={"task": bundle.task, "version": bundle.version})
        return model

    def refresh_after_stale(self, task: str, error: StaleVersion) -> ActiveModel | None:
        """A write found the pointer moved: follow it, so a retry uses the new version."""
        log.info("active version moved; following", extra={"task": task, "reason": str(error)})
        return self.sync(task)
