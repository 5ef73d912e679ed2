"""Settings of the continual-retraining loop run by `gramrec trainer`.

`gramrec trainer` reads WorkerSettings: the serving side's shared settings (store, artifacts, base data, all
`GRAMREC_*`) plus `retrain` (`GRAMREC_RETRAIN__*`). A retrain job builds its TrainSettings with
trainer.explicit_settings.explicit_train_settings, from the values it names and never from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from gramrec.service.settings import TASKS, ServiceSettings, Task


class RetrainSettings(BaseModel):
    """The continual-retraining loop run by `gramrec trainer` (GRAMREC_RETRAIN__*)."""

    interval_s: float | None = Field(
        86_400.0, gt=0, description="scheduled retrain every this many seconds, on instants aligned across replicas"
    )
    cron: str | None = Field(None, description="crontab schedule in UTC ('0 3 * * *'); when set, replaces interval_s")
    misfire_grace_s: float = Field(300.0, gt=0, description="a tick missed by less than this still runs, once")
    tasks: Annotated[list[Task], NoDecode] = Field(
        default_factory=lambda: list(TASKS), description="tasks retrained on schedule"
    )
    mode: Literal["incremental", "full"] = Field(
        "incremental",
        description="retrains on schedule, by volume, and by POST /admin/retrain unless it names one: 'incremental' "
        "(warm start, the log since the active version plus a replay sample) or 'full' (all history)",
    )
    full_cron: str | None = Field(
        None, description="crontab schedule in UTC ('0 3 * * *') of full retrains, beside the regular schedule"
    )
    volume_trigger: int | None = Field(
        None, ge=1, description="also retrain once this many interactions were logged since the last retrain"
    )
    volume_check_s: float = Field(5.0, gt=0, le=3600, description="how often the volume trigger counts new entries")
    replay_ratio: float = Field(
        1.0, ge=0, le=100, description="incremental: older users (kt) or impressions (nr) replayed per new one"
    )
    replay_min: int = Field(
        200, ge=0, description="incremental: at least this many replayed users or impressions (if there are)"
    )
    replay_max: int = Field(10_000, ge=0, description="incremental: at most this many replayed users or impressions")
    replay_seed: int = Field(0, description="incremental: seed of the replay sample (varied per retrain with its data)")
    context_answers: int = Field(
        100, ge=0, description="incremental kt: older answers kept before a student's new ones (and per replayed one)"
    )
    epochs: int = Field(1, ge=1, le=100, description="GRAM-1E epochs per retrain")
    time_budget_s: float | None = Field(None, gt=0, description="stop a retrain's training after this many seconds")
    device: str = Field("auto", description="training device ('auto': CUDA if available)")
    gate_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="most recent share of users (kt) or impressions (nr) held out for the gate"
    )
    gate_tolerance: float = Field(
        0.005,
        ge=-1,
        le=1,
        description="promote if new metric >= active metric - tolerance on the held-out slice (negative: demand a gain)",
    )
    keep_versions: int = Field(3, ge=1, description="versions per task kept for rollback (the active one always)")
    retire_grace_s: float = Field(600.0, ge=0, description="older versions' tables and files deleted after this")
    lease_ttl_s: float = Field(30.0, ge=2, description="the retrain lock expires this long after its holder dies")
    poll_s: float = Field(1.0, gt=0, description="how often an idle trainer looks at the queue")
    inject_fault: Literal["train", "export", "activate"] | None = Field(
        None, description="fault drills and tests only: make every retrain crash at this phase"
    )

    # -- the interaction log's compaction (trainer/retrain/log_compaction.py) --
    log_dir: Path | None = Field(
        None, description="folder of the interaction log's Parquet segments (default: <artifacts_dir>/interaction-log)"
    )
    compact_interval_s: float = Field(
        60.0, gt=0, description="compact the interaction log into segments this often (and before each snapshot)"
    )
    segment_entries: int = Field(50_000, ge=1, le=10_000_000, description="logged entries per Parquet segment")
    stream_retention_s: float = Field(
        3600.0, ge=0, description="compacted entries stay in the store this long before they are trimmed"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _has_a_schedule(self) -> RetrainSettings:
        if self.interval_s is None and self.cron is None:
            raise ValueError("set retrain.interval_s or retrain.cron")
        if self.replay_min > self.replay_max:
            raise ValueError(f"retrain.replay_min ({self.replay_min}) exceeds retrain.replay_max ({self.replay_max})")
        return self

    @field_validator("cron", "interval_s", "full_cron", "volume_trigger", "time_budget_s", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """Compose writes an unset variable as an empty string."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cron", "full_cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"cron {value!r}: {exc}") from None
        return value


class WorkerSettings(ServiceSettings):
    """Everything `gramrec trainer` needs: the shared store and artifacts settings, and the retrain loop's."""

    retrain: RetrainSettings = RetrainSettings()

    def interaction_log_dir(self) -> Path:
        return self.retrain.log_dir or Path(self.artifacts_dir) / "interaction-log"
