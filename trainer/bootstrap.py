"""First start: a task with no exported version gets a small model trained and exported before serving.

`gramrec serve` runs it before the app starts (the CLI wires the trainer into the first start; the service itself
never imports the trainer). Training runs in a child process (spawned), so the server process never holds torch
or the training data. Its TrainSettings come from ServiceSettings' bootstrap_* fields only, never from the
environment. The new version is activated by the app's first sync (service.activation), like any other.
A task whose data cannot be found is skipped with a warning; the server then answers 503 for it.
"""

from __future__ import annotations

import logging
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

from gramrec.service.settings import ServiceSettings, Task

log = logging.getLogger("gramrec.bootstrap")


def tasks_without_versions(settings: ServiceSettings) -> list[Task]:
    from gramrec.service.artifact import list_versions

    have = {manifest["task"] for manifest in list_versions(settings.artifacts_dir)}
    return [task for task in settings.tasks if task not in have]


def train_and_export(settings: ServiceSettings, task: Task) -> Path:
    """Trains a small model (GRAM-1E, or NoFinetune, see settings) on the task's data; returns the version dir."""
    from gramrec.trainer.explicit_settings import explicit_train_settings
    from gramrec.trainer.export import export_checkpoint
    from gramrec.trainer.train import train

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = Path(settings.artifacts_dir) / "checkpoints" / f"bootstrap-{task}-{stamp}"
    train_settings = explicit_train_settings(
        **settings.bootstrap_train,
        task=task,
        data=settings.bootstrap_data(task),
        strategy=settings.bootstrap_strategy_for(task),
        period="1e",
        epochs=settings.bootstrap_epochs,
        max_steps_per_epoch=settings.bootstrap_max_steps_per_epoch,
        device=settings.bootstrap_device,
        out=out,
    )
    log.warning("bootstrap: training", extra={"task": task, "data": str(train_settings.data), "out": str(out)})
    report = train(train_settings)
    checkpoint = out / "best" if (out / "best").is_dir() else out / "last"
    version_dir = export_checkpoint(checkpoint, settings.artifacts_dir, metrics=report["metrics"])
    log.warning("bootstrap: exported", extra={"task": task, "version": version_dir.name, "metrics": report["metrics"]})
    return version_dir


def _child(settings_json: str, task: Task, log_level: int) -> None:
    from gramrec.trainer.logs import configure_logging

    configure_logging(log_level)
    train_and_export(ServiceSettings.model_validate_json(settings_json), task)


def bootstrap(settings: ServiceSettings) -> list[Task]:
    """Trains and exports a model for every configured task that has none and whose data exists.

    Returns the tasks that still have no model (their data was missing or training failed).
    """
    missing = []
    for task in tasks_without_versions(settings):
        data = settings.bootstrap_data(task)
        if not Path(data).is_dir():
            log.warning(
                "bootstrap: no model and no training data for task; serving without it",
                extra={"task": task, "data": str(data), "setting": f"GRAMREC_BOOTSTRAP_{task.upper()}_DATA"},
            )
            missing.append(task)
            continue
        process = multiprocessing.get_context("spawn").Process(
            target=_child,
            args=(settings.model_dump_json(), task, logging.getLogger("gramrec").getEffectiveLevel()),
            name=f"gramrec-bootstrap-{task}",
        )
        process.start()
        process.join()
        if process.exitcode != 0:
            log.error(
                "bootstrap: training failed; serving without the task", extra={"task": task, "exit": process.exitcode}
            )
            missing.append(task)
    return missing
