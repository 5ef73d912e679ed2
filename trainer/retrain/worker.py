"""`gramrec trainer`: the process that runs retrain jobs, on schedule and on demand.

    API (POST /admin/retrain) ─────────┐
    APScheduler tick (each task) ──────┤
    full-retrain cron tick (each task) ┤
    volume check (each task) ──────────┴─> job queue ──> the trainer holding the retrain lease ──> RetrainJob

Any number of trainer replicas may run. Each one's scheduler fires at the same aligned instants; the first replica
to claim a tick queues its job, the others see the claim and do nothing. The volume check queues a job once
`volume_trigger` interactions were logged after the newest job's snapshot; its claim names that job, so each
position in the log triggers once across replicas. A job is taken only by the holder of the
retrain lease (a Redis lock that the holder renews every ttl/3): exactly one retrain runs at a time. If the holder
dies, its lease expires; the next holder finds the dead one's job still marked current and records it as failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from itertools import islice

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from gramrec.service.schemas import Job
from gramrec.service.settings import TASKS
from gramrec.service.store import Lease, Store, open_store
from gramrec.service.store.beacons import TRAINERS
from gramrec.trainer.retrain.job import RetrainJob, now_iso
from gramrec.trainer.retrain.log_compaction import compact_log
from gramrec.trainer.retrain.settings import WorkerSettings
from gramrec.trainer.retrain.snapshot import logged_entries

log = logging.getLogger("gramrec.trainer")

LEASE_NAME = "retrain"
HEARTBEAT_S = 5.0
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S  # a trainer silent this long counts as dead
_ALIGNED_START = datetime(2020, 1, 1, tzinfo=UTC)  # interval ticks fall on the same instants in every replica


def make_trigger(settings: WorkerSettings):
    retrain = settings.retrain
    if retrain.cron:
        return CronTrigger.from_crontab(retrain.cron, timezone=UTC)
    return IntervalTrigger(seconds=retrain.interval_s, start_date=_ALIGNED_START, timezone=UTC)


def make_full_trigger(settings: WorkerSettings) -> CronTrigger | None:
    cron = settings.retrain.full_cron
    return CronTrigger.from_crontab(cron, timezone=UTC) if cron else None


def latest_fire_time(trigger, now: datetime, lookback: timedelta) -> datetime | None:
    """The trigger's last fire time at or before `now` (within lookback): the tick a late run belongs to."""
    latest, fire = None, trigger.get_next_fire_time(None, now - lookback)
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return latest


class TrainerWorker:
    def __init__(self, settings: WorkerSettings, store: Store | None = None):
        self.settings = settings
        self.store = store or open_store(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.trigger = make_trigger(settings)
        self.full_trigger = make_full_trigger(settings)
        self.scheduler: BackgroundScheduler | None = None
        self.stop_event = threading.Event()
        self.started_at = now_iso()
        self.state: dict = {"status": "starting"}
        self._compacted_at = -float("inf")

    # -- heartbeat ---------------------------------------------------------------------------------------------------
    def beat(self) -> None:
        record = {"worker": self.name, "started_at": self.started_at, "tasks": self.settings.retrain.tasks}
        self.store.put_beacon(TRAINERS, self.name, record | self.state, HEARTBEAT_TTL_S)

    def start_heartbeat(self) -> threading.Event:
        """Publishes this trainer's heartbeat every HEARTBEAT_S until the returned event is set."""
        done = threading.Event()

        def run() -> None:
            while True:
                try:
                    self.beat()
                except Exception as exc:  # a store outage: the heartbeat expires, which is what it should say
                    log.warning("trainer heartbeat failed", extra={"error": repr(exc)})
                if done.wait(HEARTBEAT_S):
                    return

        threading.Thread(target=run, name="gramrec-heartbeat", daemon=True).start()
        return done

    # -- schedule ----------------------------------------------------------------------------------------------------
    def start_schedule(self) -> None:
        retrain = self.settings.retrain
        self.scheduler = BackgroundScheduler(timezone=UTC)
        grace = int(retrain.misfire_grace_s)
        for task in retrain.tasks:
            once = {"max_instances": 1, "coalesce": True, "misfire_grace_time": grace}
            self.scheduler.add_job(self.tick, self.trigger, args=[task], id=f"retrain-{task}", **once)
            if self.full_trigger is not None:
                self.scheduler.add_job(self.tick, self.full_trigger, args=[task, True], id=f"full-{task}", **once)
            if retrain.volume_trigger:
                every = IntervalTrigger(seconds=retrain.volume_check_s, timezone=UTC)
                self.scheduler.add_job(self.check_volume, every, args=[task], id=f"volume-{task}", **once)
        self.scheduler.start()

    def tick(self, task: str, full: bool = False) -> dict | None:
        """Queues the task's scheduled job (`full`: of the full-retrain schedule), once per tick across all
        replicas; returns the job if this one did."""
        trigger = self.full_trigger if full and self.full_trigger is not None else self.trigger
        now = datetime.now(UTC)
        grace = timedelta(seconds=self.settings.retrain.misfire_grace_s)
        fired = latest_fire_time(trigger, now, grace) or now
        ttl = max(2 * grace.total_seconds(), 3600.0)
        if not self.store.claim_tick(task, ("full-" if full else "") + fired.strftime("%Y%m%dT%H%M%S"), ttl):
            return None
        job = self.store.enqueue_job(Job.queued(task, "schedule", {"mode": "full"} if full else {}))
        log.info("scheduled retrain queued", extra={"task": task, "job": job["id"], "tick": fired.isoformat()})
        return job

    def check_volume(self, task: str) -> dict | None:
        """Queues a job once `volume_trigger` entries were logged after the newest job's snapshot (none yet: after
        the start of the log); nothing while a job of the task waits or runs. Returns the job if this one did."""
        threshold = self.settings.retrain.volume_trigger
        if not threshold:
            return None
        jobs = [job for job in self.store.list_jobs(limit=500) if job.get("task") == task]
        if jobs and jobs[0].get("status") in ("queued", "running"):
            return None
        after = next((j["data"]["last_logged_id"] for j in jobs if j.get("data", {}).get("last_logged_id")), None)
        if sum(1 for _ in islice(logged_entries(self.store, task, after), threshold)) < threshold:
            return None
        claim = f"volume-after-{jobs[0]['id'] if jobs else 'start'}"
        if not self.store.claim_tick(task, claim, 7 * 86_400.0):
            return None
        job = self.store.enqueue_job(Job.queued(task, "volume", {}))
        log.info("volume retrain queued", extra={"task": task, "job": job["id"], "after": after})
        return job

    # -- jobs --------------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        heartbeat = self.start_heartbeat()
        try:
            if self.settings.bootstrap:  # on a GPU host the trainer, not the API, trains the first models
                from gramrec.trainer.bootstrap import bootstrap

                self.state = {"status": "first start"}
                bootstrap(self.settings, self.store, self.stop_event)
            self.state = {"status": "idle"}
            self.start_schedule()
            log.warning("trainer started", extra={"worker": self.name, "tasks": self.settings.retrain.tasks})
            while not self.stop_event.is_set():
                try:
                    ran = self.work_once()
                except Exception:
                    log.exception("trainer loop error; retrying")
                    ran = None
                if ran is None:
                    self.stop_event.wait(self.settings.retrain.poll_s)
        finally:
            heartbeat.set()
            if self.scheduler is not None:
                self.scheduler.shutdown(wait=False)
            try:
                self.store.drop_beacon(TRAINERS, self.name)
            except Exception:
                pass  # it expires anyway
            self.store.close()

    def work_once(self) -> dict | None:
        """Takes the lease, runs the oldest queued job (if any) to its end, releases. Returns the finished job."""
        lease = self.store.lease(LEASE_NAME, self.settings.retrain.lease_ttl_s)
        if not lease.acquire():
            return None
        lost = threading.Event()
        renewer = self._keep_renewing(lease, lost)
        try:
            self._fail_orphan()
            job = self.store.next_job()
            self._compact_log(job)
            if job is None:
                return None
            job["worker"] = self.name
            self.state = {"status": "running", "job": job["id"], "task": job.get("task")}
            try:
                finished = RetrainJob(job, self.settings, self.store, lease, lost).run()
            finally:
                self.state = {"status": "idle"}
            self.store.update_job(finished)
            self.store.finish_current_job(finished["id"])
            self.store.prune_jobs()
            log.warning(
                "retrain finished",
                extra={k: finished.get(k) for k in ("id", "task", "status", "version", "error", "metrics", "timings")},
            )
            return finished
        finally:
            renewer.set()
            lease.release()

    def _compact_log(self, job: dict | None) -> None:
        """Compacts the interaction log before each job's snapshot and, idle, every compact_interval_s. A failure
        is logged and left for the next run: the store keeps every entry not yet safely in a segment."""
        retrain = self.settings.retrain
        now = time.monotonic()
        if job is None and now - self._compacted_at < retrain.compact_interval_s:
            return
        self._compacted_at = now
        tasks = (job["task"],) if job is not None else TASKS
        try:
            compact_log(
                self.store,
                self.settings.interaction_log_dir(),
                retrain.segment_entries,
                retrain.stream_retention_s,
                tasks,
            )
        except Exception:
            log.exception("interaction log compaction failed; retrying at the next run")

    def _fail_orphan(self) -> None:
        """A job still marked current when the lease was free belonged to a trainer that died or lost the lease."""
        job_id = self.store.current_job()
        if job_id is None:
            return
        job = self.store.get_job(job_id)
        if job is not None and job.get("status") in ("queued", "running"):
            job |= {
                "status": "failed",
                "finished_at": now_iso(),
                "error": "the trainer running this job stopped (its retrain lease expired)",
            }
            self.store.update_job(job)
            log.warning("orphaned retrain marked failed", extra={"job": job_id, "worker": job.get("worker")})
        self.store.finish_current_job(job_id)

    def _keep_renewing(self, lease: Lease, lost: threading.Event) -> threading.Event:
        done = threading.Event()
        interval = self.settings.retrain.lease_ttl_s / 3

        def renew() -> None:
            while not done.wait(interval):
                try:
                    ok = lease.renew()
                except Exception:
                    log.warning("lease renewal failed", exc_info=True)
                    ok = False
                if not ok:
                    lost.set()
                    log.error("retrain lease lost; this job cannot activate")
                    return

        threading.Thread(target=renew, name="gramrec-lease", daemon=True).start()
        return done


def live_trainers(store: Store) -> dict[str, dict]:
    """Heartbeats of the trainers alive now, by worker name (host:pid)."""
    return store.beacons(TRAINERS)


def trainer_health(settings: WorkerSettings, host: str | None = None) -> tuple[bool, str]:
    """For a container healthcheck: is a trainer of this host publishing its heartbeat?"""
    host = host or socket.gethostname()
    store = open_store(settings)
    try:
        alive = [name for name in live_trainers(store) if name.rsplit(":", 1)[0] == host]
    finally:
        store.close()
    if alive:
        return True, f"trainer alive: {', '.join(sorted(alive))}"
    return False, f"no trainer heartbeat from host {host} in the last {HEARTBEAT_TTL_S:.0f} s"


def run_trainer(settings: WorkerSettings) -> None:
    """Runs until SIGINT/SIGTERM, which let the job in progress finish first (SIGKILL: its lease expires)."""
    import signal

    worker = TrainerWorker(settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop_event.set())
    worker.run_forever()
