"""First start: a task with no exported version gets a small model trained and exported.

`gramrec serve` runs it in a background thread while the server already answers (`/healthz` 200, `/readyz` 503
with each task's progress); `gramrec trainer` runs it before taking retrains (so on a GPU host the trainer, not the
API, trains the first model). Tasks go one at a time, knowledge tracing first (seconds), so kt serves long before
news does; the app's model poll adopts each version as soon as it is exported.

Only one process bootstraps a task: the holder of the store's `first-start:<task>` lease (renewed while it
trains). Every other process (API replicas, uvicorn workers, trainers) waits until a version of the task exists,
or takes over if the holder dies and its lease expires. The holder publishes its progress (phase, done, total,
rate, ETA) as a `first-start` beacon in the store, which every /readyz shows, and logs it at info level.

Training runs in a child process (spawned), so the server process never holds torch or the training data. Its
TrainSettings come from ServiceSettings' bootstrap_* fields only, never from the environment. A task whose data
cannot be found is skipped with a warning; the server then answers 503 for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_module
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from gramrec.service.settings import ServiceSettings, Task
from gramrec.service.store import STORE_ERRORS, Store, open_store
from gramrec.service.store.beacons import FIRST_START

log = logging.getLogger("gramrec.bootstrap")

LEASE_TTL_S = 30.0
BEACON_TTL_S = 30.0
FINAL_TTL_S = 3600.0  # how long /readyz still says why a first start did not happen
LOG_EVERY_S = 10.0  # one progress line per task this often
WATCH_EVERY_S = 2.0  # how often the child reads its progress bars


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
    log.info("first start: training", extra={"task": task, "data": str(train_settings.data), "out": str(out)})
    report = train(train_settings)
    checkpoint = out / "best" if (out / "best").is_dir() else out / "last"
    version_dir = export_checkpoint(
        checkpoint, settings.artifacts_dir, metrics=report["metrics"], device=settings.bootstrap_device
    )
    log.info("first start: exported", extra={"task": task, "version": version_dir.name, "metrics": report["metrics"]})
    return version_dir


def train_export_and_activate(settings: ServiceSettings, task: Task) -> str:
    """The task's first version, trained, exported and made active in this process, synchronously: no lease, no
    child process, no progress beacon. For scripts, benchmarks and tests that need a served model before they
    start a server (`gramrec serve`'s own first start is `bootstrap`, below)."""
    from gramrec.service.registry import ModelRegistry

    version = train_and_export(settings, task).name
    store = open_store(settings)
    try:
        ModelRegistry.from_settings(store, settings, [task]).activate(version)
    finally:
        store.close()
    return version


# -- the child process ------------------------------------------------------------------------------------------------
def bar_progress(bar) -> dict:
    """A tqdm bar's state as a progress record: phase, done, total, unit, rate (units/s), ETA (s)."""
    state = bar.format_dict
    done, total, elapsed = state.get("n") or 0, state.get("total"), state.get("elapsed") or 0.0
    rate = state.get("rate") or (done / elapsed if elapsed > 0 and done else None)
    eta = (total - done) / rate if rate and total else None
    return {
        "phase": state.get("prefix") or "working",
        "done": int(done),
        "total": int(total) if total is not None else None,
        "unit": state.get("unit") or "it",
        "rate": round(rate, 3) if rate else None,
        "eta_s": round(eta, 1) if eta is not None else None,
    }


def _watch_progress_bars(progress: multiprocessing.Queue, stop: threading.Event) -> None:
    """Sends the innermost live tqdm bar's state to the parent every WATCH_EVERY_S; the bars draw to /dev/null."""
    from tqdm import tqdm

    devnull = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the child)
    original_init = tqdm.__init__

    def quiet_init(self, *args, **kwargs):  # progress goes to the logs and /readyz, not to a terminal bar
        kwargs["file"] = devnull
        original_init(self, *args, **kwargs)

    tqdm.__init__ = quiet_init
    while not stop.wait(WATCH_EVERY_S):
        bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not getattr(bar, "disable", False)]
        if bars:
            progress.put(bar_progress(bars[-1]))


def _exit_with_parent(parent: int) -> None:
    """A parent killed without cleanup (SIGKILL, or SIGTERM during start-up) would leave this training orphaned,
    exporting a second first model later; the child stops as soon as its parent is gone."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _child(settings_json: str, task: Task, log_level: int, progress: multiprocessing.Queue, parent: int) -> None:
    from gramrec.trainer.logs import configure_logging

    configure_logging(log_level)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    stop = threading.Event()
    threading.Thread(target=_watch_progress_bars, args=(progress, stop), daemon=True).start()
    try:
        train_and_export(ServiceSettings.model_validate_json(settings_json), task)
    finally:
        stop.set()


# -- the parent: lease, progress, waiting ---------------------------------------------------------------------------
def _publish(store: Store, task: str, record: dict, ttl_s: float = BEACON_TTL_S) -> None:
    try:
        store.put_beacon(FIRST_START, task, record, ttl_s)
    except STORE_ERRORS as exc:  # progress is informative only; the training goes on
        log.warning("first start: cannot publish progress", extra={"task": task, "error": repr(exc)})


def _train_holding_lease(settings: ServiceSettings, store: Store, task: Task, lease) -> bool:
    """Runs the child, renews the lease, relays progress to the store and the log. True if it exported."""
    started = time.time()
    base = {"status": "training", "phase": "starting", "since": datetime.now(UTC).isoformat(timespec="seconds")}
    _publish(store, task, base)
    log.info(
        "first start: no model yet; training one", extra={"task": task, "data": str(settings.bootstrap_data(task))}
    )
    context = multiprocessing.get_context("spawn")
    progress: multiprocessing.Queue = context.Queue()
    process = context.Process(
        target=_child,
        args=(
            settings.model_dump_json(),
            task,
            logging.getLogger("gramrec").getEffectiveLevel(),
            progress,
            os.getpid(),
        ),
        name=f"gramrec-bootstrap-{task}",
        daemon=True,  # a server that stops takes its first-start training with it
    )
    process.start()
    last_renew = last_log = time.monotonic()
    record = dict(base)
    while process.is_alive() or not progress.empty():
        try:
            record = base | progress.get(timeout=1.0) | {"elapsed_s": round(time.time() - started, 1)}
            _publish(store, task, record)
        except queue_module.Empty:
            pass
        now = time.monotonic()
        if now - last_renew > LEASE_TTL_S / 3:
            last_renew = now
            try:
                if not lease.renew():
                    log.warning(
                        "first start: lease lost; another process may train this task too", extra={"task": task}
                    )
            except STORE_ERRORS as exc:
                log.warning("first start: cannot renew the lease", extra={"task": task, "error": repr(exc)})
        if now - last_log >= LOG_EVERY_S and record.get("phase") != "starting":
            last_log = now
            log.info("first start: progress", extra={"task": task} | {k: v for k, v in record.items() if k != "status"})
    process.join()
    if process.exitcode != 0:
        log.error(
            "first start: training failed; serving without the task", extra={"task": task, "exit": process.exitcode}
        )
        failed = {"status": "failed", "exit": process.exitcode, "elapsed_s": round(time.time() - started, 1)}
        _publish(store, task, failed, FINAL_TTL_S)
        return False
    log.info("first start: model exported", extra={"task": task, "seconds": round(time.time() - started, 1)})
    try:
        store.drop_beacon(FIRST_START, task)
    except STORE_ERRORS:
        pass
    return True


def bootstrap_task(
    settings: ServiceSettings, store: Store, task: Task, stop: threading.Event | None = None, poll_s: float = 1.0
) -> bool:
    """Makes sure `task` gets a version: trains one under the lease, or waits for the holder's. True when one exists."""
    stop = stop or threading.Event()
    waiting_logged = False
    while not stop.is_set():
        if task not in tasks_without_versions(settings):
            return True
        lease = store.lease(f"{FIRST_START}:{task}", LEASE_TTL_S)
        try:
            held = lease.acquire()
        except STORE_ERRORS as exc:
            log.warning("first start: store unreachable; retrying", extra={"task": task, "error": repr(exc)})
            stop.wait(max(poll_s, 1.0))
            continue
        if held:
            try:
                if task not in tasks_without_versions(settings):  # exported while we took the lease
                    return True
                return _train_holding_lease(settings, store, task, lease)
            finally:
                lease.release()
        if not waiting_logged:
            log.info(
                "first start: another process is training this task; waiting for its version", extra={"task": task}
            )
            waiting_logged = True
        stop.wait(poll_s)
    return False


def bootstrap(
    settings: ServiceSettings, store: Store | None = None, stop: threading.Event | None = None, poll_s: float = 1.0
) -> list[Task]:
    """Trains and exports a model for every configured task that has none and whose data exists, kt first.

    Returns the tasks that still have no model (their data was missing or training failed).
    """
    missing: list[Task] = []
    todo = sorted(tasks_without_versions(settings), key=lambda task: task != "kt")  # seconds before minutes
    if not todo:
        return missing
    own_store = store is None
    store = store or open_store(settings)
    try:
        for task in todo:
            data = settings.bootstrap_data(task)
            if not Path(data).is_dir():
                log.warning(
                    "first start: no model and no training data for task; serving without it",
                    extra={"task": task, "data": str(data), "setting": f"GRAMREC_BOOTSTRAP_{task.upper()}_DATA"},
                )
                _publish(store, task, {"status": "no training data", "data": str(data)}, FINAL_TTL_S)
                missing.append(task)
                continue
            if not bootstrap_task(settings, store, task, stop, poll_s):
                missing.append(task)
    finally:
        if own_store:
            store.close()
    return missing


def start_in_background(settings: ServiceSettings) -> threading.Thread:
    """`gramrec serve`: the first start runs beside the server, which answers from the first second."""

    def run() -> None:
        try:
            bootstrap(settings)
        except Exception:
            log.exception("first start failed")

    thread = threading.Thread(target=run, name="gramrec-first-start", daemon=True)
    thread.start()
    return thread
