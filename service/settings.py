"""All serving configuration in one typed object, filled from GRAMREC_* environment variables (and REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Task = Literal["kt", "nr"]
TASKS: tuple[Task, ...] = ("kt", "nr")

# Not a setting on purpose: ':', '*', '{', '}' and whitespace can never appear in an item id, so an id can never
# reach into another Redis key, a key pattern or a hash tag, and the stream and text formats need no escaping.
ITEM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
VERSION_PATTERN = r"^[a-z]{2}-[0-9A-Za-z._-]{1,64}$"


class Limits(BaseModel):
    """Caps on every request input, so a request's cost is bounded before any work is done."""

    max_history: int = Field(1000, ge=1, description="answers (kt) or clicks (nr) in one request's history")
    max_targets: int = Field(200, ge=1, description="kt: target items per prediction")
    max_candidates: int = Field(500, ge=1, description="nr: candidate news per request")
    max_items_per_request: int = Field(64, ge=1, description="item texts in one request (POST /items, /predict)")
    max_text_chars: int = Field(10_000, ge=1, description="characters of one item text")
    max_events: int = Field(1000, ge=1, description="events or impressions in one POST /interactions")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size; larger bodies get 413")
    max_exclude: int = Field(1000, ge=0, description="POST /recommend: `exclude` ids, kt `questions` ids")


class ServiceSettings(BaseSettings):
    """Everything `gramrec serve` needs. Nested limits read e.g. GRAMREC_LIMITS__MAX_HISTORY."""

    model_config = SettingsConfigDict(
        env_prefix="GRAMREC_", env_nested_delimiter="__", populate_by_name=True, extra="ignore"
    )

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "GRAMREC_REDIS_URL"),
        description="redis://host:port/db; unset: the embedded sqlite store (one host only)",
    )
    redis_key_prefix: str = Field("gramrec:", pattern=r"^[A-Za-z0-9_.:-]{0,64}$")
    redis_timeout_s: float = Field(
        2.0, gt=0, description="longest wait for one Redis reply; a hung Redis turns into a 503 after this"
    )
    redis_connect_timeout_s: float = Field(1.0, gt=0, description="longest wait to open a Redis connection")
    redis_retries: int = Field(
        1, ge=0, le=5, description="retries of a command whose connection failed (Redis restarted); never of a timeout"
    )
    artifacts_dir: Path = Field(Path("artifacts"), description="exported model versions, one folder each")
    embedded_store_path: Path = Path("artifacts/item-table.sqlite3")
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin; unset: admin API disabled")
    limits: Limits = Limits()

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed browser origins; empty: CORS off"
    )

    tasks: Annotated[list[Task], NoDecode] = Field(
        default_factory=lambda: list(TASKS), description="tasks this server must serve"
    )
    model_poll_interval_s: float = Field(
        5.0, ge=0, description="how often to follow an activation done by another process; 0: never"
    )
    follow_activations: bool = Field(
        True, description="swap as soon as another process publishes an activation (Redis pub/sub)"
    )
    ort_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads per session")
    index_max_bytes: int = Field(
        2 << 30, ge=1 << 20, description="memory bound of one catalog index (per task, per worker) for /recommend"
    )
    index_ann_threshold: int = Field(
        20_000,
        ge=1,
        description="catalogs of at least this many items (and 1,024) get an approximate index (a quantised scan)",
    )
    kt_cache_entries: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="kt: students' LSTM states kept per worker and version (about 2.3 KB each at a 128-wide, 2-layer "
        "head), so a resent, growing history costs one LSTM step per new answer; 0: no cache",
    )
    index_refresh_s: float = Field(
        0.25, gt=0, le=1, description="how often each process reads items added through other processes"
    )

    bootstrap: bool = Field(True, description="train and export a small model for a task that has none")
    bootstrap_kt_data: Path = Path("../shared/data/codeworkout_s19")
    bootstrap_nr_data: Path = Path("../shared/data/mind_small_subset")
    bootstrap_epochs: int = Field(1, ge=1)
    bootstrap_max_steps_per_epoch: int | None = Field(None, ge=1, description="cut bootstrap epochs short")
    bootstrap_device: str = "auto"
    bootstrap_train: dict[str, Any] = Field(
        default_factory=dict,
        description='more training settings of first-start models, as JSON (e.g. {"hidden_dim": 64}); '
        "first-start and retrain training never reads other variables",
    )
    bootstrap_strategy: Literal["auto", "gram", "nofinetune"] = Field(
        "auto",
        description="auto: GRAM-1E for kt; NoFinetune for nr, whose 51k news would take GRAM many CPU minutes",
    )

    @field_validator("redis_url", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """`GRAMREC_ADMIN_TOKEN=` (empty, as compose writes an unset variable) means unset, never an empty token."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value if value and str(value).strip() else None

    @field_validator("tasks", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """Environment variables give 'kt,nr'; code gives lists. Duplicates dropped, order kept."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return list(dict.fromkeys(value))

    def bootstrap_data(self, task: Task) -> Path:
        return self.bootstrap_kt_data if task == "kt" else self.bootstrap_nr_data

    def bootstrap_strategy_for(self, task: Task) -> str:
        if self.bootstrap_strategy != "auto":
            return self.bootstrap_strategy
        return "gram" if task == "kt" else "nofinetune"
