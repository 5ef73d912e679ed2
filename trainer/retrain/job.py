"""One retrain job: snapshot -> warm-started GRAM-1E -> gate -> export -> activate -> retire old versions.

Runs inside `gramrec trainer` while it holds the retrain lease (trainer/retrain/worker.py). Every phase is timed into the
job record. The gate scores the new model and the active one on the same held-out slice of the most recent
users (kt) or impressions (nr); the new one is promoted only if it is no worse than the active one minus
`gate_tolerance`. Activation is a compare-and-set on the task's pointer that also checks the lease, so a job that
lost its lock, or whose base version was replaced meanwhile (an operator's rollback), cannot activate.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from gramrec.service.activation import ActivationConflict, activate, bundle_loader, prepare
from gramrec.service.artifact import list_versions
from gramrec.service.errors import GramrecError
from gramrec.service.settings import Task
from gramrec.service.store import Lease, LeaseLost, Store
from gramrec.trainer.retrain.settings import WorkerSettings

log = logging.getLogger("gramrec.retrain")

CHECKPOINTS_DIR = "checkpoints"  # artifacts/checkpoints/<version>/: the PyTorch checkpoint a version came from
JOBS_DIR = "jobs"  # artifacts/jobs/<job id>/: a running job's snapshot and training run, removed at its end
RETIRED_FILE = "retired.json"  # version -> when it left the last `keep_versions`; deleted after the grace period
TRAINED_ON_FILE = "trained_on.json"  # in a version's checkpoint: the last logged id it trained on, its gate units


class InjectedFault(GramrecError, RuntimeError):
    """Raised at a phase named by GRAMREC_RETRAIN__INJECT_FAULT (fault drills and tests)."""


class GateError(GramrecError, RuntimeError):
    """The gate cannot judge (e.g. the held-out slice has a single class)."""


# The settings of the active version that its retrain keeps (the encoder pass, the head's shape, the optimiser,
# the item text); data, strategy, epochs, budget, device (and its encoder_memory_gib) and output are the job's own.
KEPT_SETTINGS = {
    "encoder_dir",
    "max_tokens",
    "pooling",
    "use_abstract",
    "attention",
    "encoder_batch_size",
    "encoder_batch_tokens",
    "regress_batch_size",
    "table_lr",
    "regress_lr",
    "regress_fit",
    "regress_max_passes",
    "regress_backtrack",
    "regress_max_s",
    "freeze_bottom_layers",
    "hidden_dim",
    "batch_size",
    "cf_lr_scaling",
    "cf_lr_reference_batch",
    "max_seq_len",
    "history_len",
    "negatives",
    "optimizer",
    "lr_cf",
    "lr_encoder",
    "warmup_steps",
    "seed",
}


def primary_metric(task: str) -> str:
    """The metric the task's own model selection uses, and so its gate."""
    from gramrec.trainer.kt_task import KnowledgeTracingTask
    from gramrec.trainer.nr_task import NewsTask

    tasks: dict[str, type[KnowledgeTracingTask] | type[NewsTask]] = {"kt": KnowledgeTracingTask, "nr": NewsTask}
    return tasks[task].primary_metric


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class RetrainJob:
    """Runs one job record to its end state; `run()` returns the finished record (status set)."""

    def __init__(self, job: dict, settings: WorkerSettings, store: Store, lease: Lease, lease_lost: threading.Event):
        self.job = job
        self.settings = settings
        self.retrain = settings.retrain
        self.store = store
        self.lease = lease
        self.lease_lost = lease_lost
        self.artifacts = Path(settings.artifacts_dir)
        self.workdir = self.artifacts / JOBS_DIR / job["id"]

    # -- driver ------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        task = self.job["task"]
        self.job |= {"status": "running", "started_at": now_iso()}
        self.job["base_version"] = self.store.active_version(task)
        self.store.update_job(self.job)
        try:
            self._run(task)
        except Exception as exc:
            log.exception("retrain failed", extra={"job": self.job["id"], "task": task})
            self.job |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.job["finished_at"] = now_iso()
        return self.job

    def _run(self, task: str) -> None:
        from gramrec.trainer.retrain.snapshot import build_snapshot

        base_checkpoint = self._checkpoint_of(self.job["base_version"])
        base_settings = self._base_settings(task, base_checkpoint)
        increment = self._increment(base_checkpoint)
        snapshot = self._phase(
            "snapshot",
            lambda: build_snapshot(
                task,
                self.settings.bootstrap_data(cast(Task, task)),
                self.store,
                self.workdir / "data",
                self.retrain.gate_fraction,
                use_abstract=base_settings.get("use_abstract", False),
                increment=increment,
            ),
        )
        self.job["data"] = snapshot.summary() | self.job.get("data", {})
        self._snapshot = snapshot
        report = self._phase("train", lambda: self._train(base_settings, snapshot.folder, base_checkpoint))
        metric = primary_metric(task)
        new = report["metrics"].get(metric)
        active = self._phase("gate", lambda: self._active_metric(base_checkpoint, snapshot.folder, metric))
        promote = self._gate(metric, new, active)
        if not promote:
            self.job["status"] = "rejected"
            return
        version_dir = self._phase("export", lambda: self._export(task, report))
        self.job["version"] = version_dir.name
        bundle = self._phase("table", lambda: self._table(version_dir.name, snapshot.texts))
        self._phase("activate", lambda: self._activate(bundle, snapshot.texts))
        self._phase(
            "retire",
            lambda: retire_old_versions(
                self.store, self.artifacts, task, self.retrain.keep_versions, self.retrain.retire_grace_s
            ),
        )
        self.job["status"] = "succeeded"

    def _phase(self, name: str, work: Callable):
        if self.lease_lost.is_set():
            raise LeaseLost("the retrain lease was lost; another trainer may run jobs now")
        if self.retrain.inject_fault == name:
            raise InjectedFault(f"injected fault at phase {name!r} (GRAMREC_RETRAIN__INJECT_FAULT)")
        started = time.perf_counter()
        result = work()
        self.job["timings"][name] = round(time.perf_counter() - started, 3)
        self.store.update_job(self.job)
        return result

    # -- phases ------------------------------------------------------------------------------------------------------
    def _increment(self, base_checkpoint: Path | None):
        """What an incremental job trains on beyond the new log (None: a full retrain, asked for or needed)."""
        from gramrec.trainer.retrain.increment import Increment

        requested = self.job.get("params", {}).get("mode") or self.retrain.mode
        self.job["data"] = {"requested_mode": requested}
        if requested == "full":
            return None
        if base_checkpoint is None:
            self.job["data"]["fallback"] = "no checkpoint of an active version to start from: full retrain"
            return None
        try:
            record = read_trained_on(base_checkpoint)
        except ValueError as exc:
            self.job["data"]["fallback"] = f"{exc}: full retrain"
            return None
        after = record.get("last_logged_id")
        return Increment(
            after=after,
            carried=frozenset(record.get("gate_units", [])),
            replay_ratio=self.retrain.replay_ratio,
            replay_min=self.retrain.replay_min,
            replay_max=self.retrain.replay_max,
            context_answers=self.retrain.context_answers,
            seed=f"{self.retrain.replay_seed}:{after}",
        )

    def _base_settings(self, task: str, base_checkpoint: Path | None) -> dict:
        """The training settings a retrain keeps: the active version's (else those of a first start)."""
        from gramrec.trainer.checkpoint import read_config

        saved = read_config(base_checkpoint)["settings"] if base_checkpoint else self.settings.bootstrap_train
        return {k: v for k, v in saved.items() if k in KEPT_SETTINGS} | {"task": task}

    def _known_rows(self):
        """The active version's exported table: an incremental run's starting rows (items not re-encoded)."""
        from gramrec.trainer.known_rows import KnownRows

        version = self.job["base_version"]
        if version is None or self.job["data"].get("mode") != "incremental":
            return None
        try:
            return KnownRows.from_artifact(self.artifacts / version)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("no item table to start from; encoding every item", extra={"error": repr(exc)})
            return None

    def _train(self, base_settings: dict, data: Path, base_checkpoint: Path | None) -> dict:
        from gramrec.trainer import train as train_module
        from gramrec.trainer.explicit_settings import explicit_train_settings

        params = self.job.get("params", {})
        settings = explicit_train_settings(
            **base_settings,
            data=data,
            strategy="gram",
            period="1e",
            epochs=params.get("epochs", self.retrain.epochs),
            time_budget_s=params.get("time_budget_s", self.retrain.time_budget_s),
            patience=max(1, params.get("epochs", self.retrain.epochs)),
            init_from=base_checkpoint,
            out=self.workdir / "run",
            device=self.retrain.device,
            progress=False,
        )
        report = train_module.train(settings, known_rows=self._known_rows())
        self.job["data"]["items_encoded_at_start"] = report.get("setup_items_encoded")
        self.job["data"]["train"] = train_summary(report)
        return report

    def _active_metric(self, base_checkpoint: Path | None, data: Path, metric: str) -> float | None:
        """The active model's metric on the same held-out slice; None when there is no active model."""
        if base_checkpoint is None:
            return None
        from gramrec.trainer.evaluate import evaluate_checkpoint

        return evaluate_checkpoint(base_checkpoint, data, "test", self.retrain.device)["metrics"].get(metric)

    def _gate(self, metric: str, new: float | None, active: float | None) -> bool:
        tolerance = self.retrain.gate_tolerance
        self.job["metrics"] = {"metric": metric, "new": new, "active": active, "tolerance": tolerance}
        if new is None:
            raise GateError(f"the held-out slice cannot be scored ({metric} undefined: a single class?)")
        promote = active is None or new >= active - tolerance
        self.job["metrics"]["promoted"] = promote
        log.info("gate", extra={"job": self.job["id"]} | self.job["metrics"])
        return promote

    def _export(self, task: str, report: dict) -> Path:
        from gramrec.trainer.export import default_version, export_checkpoint

        run = self.workdir / "run"
        best = run / "best" if (run / "best").is_dir() else run / "last"
        version = default_version(task, datetime.now(UTC))
        checkpoint = self.artifacts / CHECKPOINTS_DIR / version
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(best), checkpoint)  # kept: the next retrain warm-starts from it
        self._write_trained_on(checkpoint)
        try:
            return export_checkpoint(
                checkpoint,
                self.artifacts,
                version,
                metrics=report["metrics"],
                device=self.retrain.device,
                progress=False,
            )
        except BaseException:
            shutil.rmtree(checkpoint, ignore_errors=True)
            raise

    def _write_trained_on(self, checkpoint: Path) -> None:
        """What the next incremental retrain starts after: this snapshot's last logged id, and its gate units
        (held out now, trained on next time; for news only logged impressions, L<entry id>, need it)."""
        snapshot = self._snapshot
        units = snapshot.gate_units if snapshot.task == "kt" else [u for u in snapshot.gate_units if u.startswith("L")]
        record = {"mode": snapshot.mode, "last_logged_id": snapshot.last_logged_id, "gate_units": units}
        (checkpoint / TRAINED_ON_FILE).write_text(json.dumps(record))

    def _table(self, version: str, trained_texts: dict[str, str]):
        """Loads the new bundle, checks its golden answer and writes its item table to the store (timed apart
        from the switch itself)."""
        bundle = bundle_loader(threads=self.settings.ort_threads)(self.artifacts, version)
        bundle.self_check()
        prepare(self.store, bundle, trained_texts)
        return bundle

    def _activate(self, bundle, trained_texts: dict[str, str]) -> None:
        try:
            activate(
                self.store,
                self.artifacts,
                bundle.version,
                load_bundle=lambda _root, _version: bundle,
                list_versions=list_versions,
                lease=self.lease,
                known_texts=trained_texts,
                expected_active=self.job["base_version"],
            )
        except ActivationConflict as exc:
            raise ActivationConflict(f"{exc} (the active version is no longer {self.job['base_version']})") from None

    def _checkpoint_of(self, version: str | None) -> Path | None:
        """The PyTorch checkpoint an exported version came from, if it is still there inside the artifacts dir."""
        if version is None:
            return None
        candidates = [self.artifacts / CHECKPOINTS_DIR / version]
        manifest = self.artifacts / version / "manifest.json"
        if manifest.is_file():
            source = json.loads(manifest.read_text()).get("source_checkpoint")
            if source:
                candidates.append(Path(source))
        root = self.artifacts.resolve()
        for path in candidates:
            path = path.resolve()
            if path.is_relative_to(root) and (path / "model.safetensors").is_file():
                return path
        log.warning(
            "no checkpoint for the active version; training from the pre-trained encoder", extra={"version": version}
        )
        return None


def read_trained_on(checkpoint: Path) -> dict:
    """A version's trained_on.json; {} when it has none (a first start's, trained on the base data only).
    Raises ValueError naming the file when it is not what this module writes."""
    path = checkpoint / TRAINED_ON_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    after = record.get("last_logged_id") if isinstance(record, dict) else None
    units = record.get("gate_units", []) if isinstance(record, dict) else None
    stream_id = after is None or (isinstance(after, str) and all(part.isdigit() for part in after.split("-")))
    listed = isinstance(units, list) and all(isinstance(unit, str) for unit in units)
    if not (isinstance(record, dict) and stream_id and listed):
        raise ValueError(f"{path}: expected last_logged_id (a stream id or null) and gate_units (a list of ids)")
    return record


def train_summary(report: dict) -> dict:
    """Where a retrain's training time went: steps, the whole run, checkpoint writes, GRAM's regressions."""
    regressions = [r for epoch in report.get("history", []) for r in epoch.get("regressions", [])]
    return {
        "steps": report.get("steps"),
        "interactions_per_epoch": report.get("interactions_per_epoch"),
        "wall_s": round(float(report.get("wall_time_s") or 0.0), 3),
        "checkpoint_io_s": round(float(report.get("checkpoint_io_s") or 0.0), 3),
        "regression_s": round(sum(float(r.get("seconds", 0.0)) for r in regressions), 3),
        "regression_rows": sum(int(r.get("rows", 0)) for r in regressions),
    }


# -- retention -------------------------------------------------------------------------------------------------------
def retire_old_versions(store: Store, artifacts: Path, task: str, keep: int, grace_s: float) -> list[str]:
    """Keeps the newest `keep` versions of the task and the active one. Others are marked retired, and deleted
    (item table, artifact folder, checkpoint) once retired for `grace_s`, so requests still using them finish and
    a recent rollback target stays available. Returns the versions deleted. Run only under the retrain lease."""
    marks_path = artifacts / RETIRED_FILE
    marks: dict[str, float] = json.loads(marks_path.read_text()) if marks_path.is_file() else {}
    active = store.active_version(task)
    versions = [m["version"] for m in list_versions(artifacts) if m.get("task") == task]
    kept = set(versions[:keep]) | {active}
    deleted = []
    now = time.time()
    for version in versions:
        if version in kept:
            marks.pop(version, None)
            continue
        marks.setdefault(version, now)
        if now - marks[version] >= grace_s:
            store.drop_table(version)
            shutil.rmtree(artifacts / version, ignore_errors=True)
            shutil.rmtree(artifacts / CHECKPOINTS_DIR / version, ignore_errors=True)
            marks.pop(version)
            deleted.append(version)
    tmp = marks_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(marks))
    tmp.replace(marks_path)
    if deleted:
        log.info("versions deleted", extra={"task": task, "versions": deleted})
    return deleted
