"""Request and response bodies. Formats are checked here; size limits (settings) in service.limits.

Every request model forbids unknown fields and NaN/inf, and every id must match ITEM_ID_PATTERN.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
)

from gramrec.service.settings import ITEM_ID_PATTERN, Task

ItemId = Annotated[str, StringConstraints(pattern=ITEM_ID_PATTERN)]
UserId = Annotated[str, StringConstraints(pattern=ITEM_ID_PATTERN)]
MAX_UNIX_SECONDS = 2e10  # year 2603; pydantic would read larger numbers as milliseconds


def _unix_seconds(value):
    """Numbers are Unix seconds in [0, 2e10], nothing else (not milliseconds, not before 1970)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not 0 <= value <= MAX_UNIX_SECONDS:
        raise ValueError(f"a numeric timestamp is Unix seconds between 0 and {MAX_UNIX_SECONDS:.0e}")
    return value


# ISO 8601 or Unix seconds; the schema says both (pydantic's would claim strings only).
Timestamp = Annotated[
    datetime,
    BeforeValidator(_unix_seconds),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0, "maximum": 2e10}]},
        mode="validation",
    ),
]
# JSON true/false or 0/1, nothing looser ("yes", 0.5): a mistyped label must not become a silent True.
Binary = Annotated[StrictBool | Literal[0, 1], AfterValidator(bool)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ItemText(RequestModel):
    item_id: ItemId
    text: Annotated[str, StringConstraints(min_length=1)]


# -- /predict --------------------------------------------------------------------------------------------------------
class Answer(RequestModel):
    item_id: ItemId
    correct: Binary


class KTPredictRequest(RequestModel):
    """P(correct) of each target item for a student with this answer history (oldest first)."""

    task: Literal["kt"]
    history: list[Answer] = Field(default_factory=list)
    targets: list[ItemId] = Field(min_length=1)
    items: list[ItemText] = Field(default_factory=list, description="texts of items the model may not know")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "kt",
                    "history": [{"item_id": "1", "correct": True}, {"item_id": "3", "correct": False}],
                    "targets": ["5", "12"],
                }
            ]
        },
    )


class NRPredictRequest(RequestModel):
    """Click scores of candidate news for a reader who clicked `history` (oldest first)."""

    task: Literal["nr"]
    history: list[ItemId] = Field(min_length=1)
    candidates: list[ItemId] = Field(min_length=1)
    items: list[ItemText] = Field(default_factory=list, description="texts of items the model may not know")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "nr",
                    "history": ["N55528", "N19639"],
                    "candidates": ["N61837", "N900001"],
                    "items": [{"item_id": "N900001", "text": "Local team wins the championship in overtime"}],
                }
            ]
        },
    )


PredictRequest = Annotated[KTPredictRequest | NRPredictRequest, Field(discriminator="task")]


class Prediction(BaseModel):
    item_id: str
    probability: float


class Score(BaseModel):
    item_id: str
    score: float


class KTPredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class NRPredictResponse(BaseModel):
    model_version: str
    scores: list[Score]
    ranking: list[str] = Field(description="candidate ids, highest score first")


# -- /items ----------------------------------------------------------------------------------------------------------
# Category names: letters, digits, space and a little punctuation (MIND's are lower-case words like "foodanddrink").
CATEGORY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _&.,'-]{0,63}$"
Category = Annotated[str, StringConstraints(pattern=CATEGORY_PATTERN)]


class NewItem(ItemText):
    """An item to add or update, with optional metadata for POST /recommend's filters (replaced whole each time)."""

    category: Category | None = None
    subcategory: Category | None = None
    published_at: Timestamp | None = Field(None, description="ISO 8601 or Unix seconds; naive times are UTC")

    def metadata(self) -> dict:
        out: dict = {}
        if self.category is not None:
            out["category"] = self.category
        if self.subcategory is not None:
            out["subcategory"] = self.subcategory
        if self.published_at is not None:
            moment = self.published_at if self.published_at.tzinfo else self.published_at.replace(tzinfo=UTC)
            out["published_at"] = moment.timestamp()
        return out


class AddItemsRequest(RequestModel):
    task: Task
    items: list[NewItem] = Field(min_length=1)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "nr",
                    "items": [{"item_id": "N900001", "text": "Local team wins the championship in overtime"}],
                }
            ]
        },
    )


class AddItemsResponse(BaseModel):
    model_version: str
    item_ids: list[str]


class ItemResponse(BaseModel):
    item_id: str
    text: str | None = Field(description="the item's text: from the model's dataset, or as added through the API")
    model_version: str
    dim: int


# -- /recommend ------------------------------------------------------------------------------------------------------
MAX_K = 100


def _a_json_number(value: object) -> object:
    """Numbers only: not a boolean, not a string that looks like one (pydantic's lax mode reads both)."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


Count = Annotated[
    int, Field(ge=1, le=MAX_K, description=f"how many to recommend, 1 to {MAX_K}"), BeforeValidator(_a_json_number)
]


OpenProbability = Annotated[float, Field(gt=0, lt=1), BeforeValidator(_a_json_number)]
ClosedProbability = Annotated[float, Field(ge=0, le=1), BeforeValidator(_a_json_number)]


class Band(RequestModel):
    low: ClosedProbability
    high: ClosedProbability


class KTRecommendRequest(RequestModel):
    """The next `k` questions for a student, by how close P(correct) is to `target`, or inside `[low, high]`."""

    task: Literal["kt"]
    history: list[Answer] = Field(default_factory=list, description="answers, oldest first; never recommended")
    k: Count = 10
    target: OpenProbability | None = Field(None, description="wanted P(correct); default 0.7 unless a band is given")
    band: Band | None = Field(None, description="only questions with low <= P(correct) <= high; not with target")
    questions: list[ItemId] | None = Field(None, description="recommend only among these questions")
    items: list[ItemText] = Field(default_factory=list, description="texts of history items the model may not know")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "kt",
                    "history": [{"item_id": "1", "correct": True}, {"item_id": "3", "correct": False}],
                    "k": 5,
                    "target": 0.7,
                }
            ]
        },
    )


class NRRecommendRequest(RequestModel):
    """The top `k` news of the whole catalog for a reader who clicked `history`, by /predict's score."""

    task: Literal["nr"]
    history: list[ItemId] = Field(min_length=1, description="clicked news, oldest first; never recommended")
    k: Count = 10
    exclude: list[ItemId] = Field(default_factory=list, description="news never to recommend (already shown)")
    category: Category | None = None
    subcategory: Category | None = None
    published_after: Timestamp | None = Field(
        None, description="only news published after this (news without published_at are left out)"
    )
    items: list[ItemText] = Field(default_factory=list, description="texts of history items the model may not know")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"task": "nr", "history": ["N55528", "N19639"], "k": 10, "category": "sports"}]
        },
    )


RecommendRequest = Annotated[KTRecommendRequest | NRRecommendRequest, Field(discriminator="task")]

RECOMMEND_EXAMPLES: dict[str, dict] = {
    "nr": {
        "summary": "news: top 10 sports news for a reader",
        "value": {"task": "nr", "history": ["N55528", "N19639"], "k": 10, "category": "sports"},
    },
    "nr_fresh": {
        "summary": "news: top 5 published after a date, excluding what was shown",
        "value": {
            "task": "nr",
            "history": ["N55528"],
            "k": 5,
            "exclude": ["N61837"],
            "published_after": "2026-11-01T00:00:00Z",
        },
    },
    "kt": {
        "summary": "questions: next 10 at P(correct) closest to 0.7",
        "value": {"task": "kt", "history": [{"item_id": "1", "correct": True}], "k": 10, "target": 0.7},
    },
    "kt_band": {
        "summary": "questions: next 5 with P(correct) in [0.5, 0.8] among a subset",
        "value": {
            "task": "kt",
            "history": [{"item_id": "1", "correct": False}],
            "k": 5,
            "band": {"low": 0.5, "high": 0.8},
            "questions": ["3", "5", "12", "17"],
        },
    },
}


class RecommendedQuestion(BaseModel):
    item_id: str
    probability: float = Field(description="predicted P(correct) if the student answers it next")


class RecommendedNews(BaseModel):
    item_id: str
    score: float = Field(description="the click score /predict gives this item")
    category: str | None = None
    subcategory: str | None = None
    published_at: float | None = Field(None, description="Unix seconds")


class KTRecommendResponse(BaseModel):
    model_version: str
    items: list[RecommendedQuestion] = Field(description="closest to the target (or the band's middle) first")


class NRRecommendResponse(BaseModel):
    model_version: str
    items: list[RecommendedNews] = Field(description="highest score first")
    approximate: bool = Field(description="whether the approximate index answered (large catalogs, no filter)")


class ItemSummary(BaseModel):
    item_id: str
    text: str | None
    source: Literal["model", "api"] = Field(description="came with the model's dataset, or added through POST /items")


class ItemsPage(BaseModel):
    """One page of a task's active item table: the model's items in its order, then items added through the API."""

    task: Task
    model_version: str
    total: int = Field(description="items in the table")
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last one")
    items: list[ItemSummary]


# -- /interactions ---------------------------------------------------------------------------------------------------
class AnswerEvent(RequestModel):
    item_id: ItemId
    correct: Binary
    timestamp: Timestamp | None = Field(None, description="ISO 8601 or Unix seconds; naive times are UTC")


class KTInteractions(RequestModel):
    task: Literal["kt"]
    user_id: UserId
    events: list[AnswerEvent] = Field(min_length=1)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "kt",
                    "user_id": "student-42",
                    "events": [{"item_id": "5", "correct": True, "timestamp": "2026-01-05T10:00:00Z"}],
                }
            ]
        },
    )


class Impression(RequestModel):
    item_id: ItemId
    clicked: Binary


class NRInteractions(RequestModel):
    task: Literal["nr"]
    user_id: UserId
    history: list[ItemId] = Field(default_factory=list, description="news the reader had clicked before")
    impressions: list[Impression] = Field(min_length=1)
    timestamp: Timestamp | None = Field(None, description="ISO 8601 or Unix seconds; naive times are UTC")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "nr",
                    "user_id": "reader-7",
                    "history": ["N55528"],
                    "impressions": [{"item_id": "N61837", "clicked": True}, {"item_id": "N19639", "clicked": False}],
                    "timestamp": 1767607200,
                }
            ]
        },
    )


Interactions = Annotated[KTInteractions | NRInteractions, Field(discriminator="task")]


class InteractionsResponse(BaseModel):
    ids: list[str] = Field(description="stream ids of the logged entries, in request order")


# -- /admin ----------------------------------------------------------------------------------------------------------
def _not_a_bool(value: object) -> object:
    """JSON true/false is not a number (pydantic's lax mode would read it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


class RetrainRequest(RequestModel):
    """A GRAM-1E retrain of the task's active model: incremental (the log since it, plus a replay sample) or full."""

    task: Task
    epochs: Annotated[int, Field(ge=1, le=100), BeforeValidator(_not_a_bool)] | None = Field(
        None, description="default: GRAMREC_RETRAIN__EPOCHS"
    )
    time_budget_s: Annotated[float, Field(gt=0, le=86_400), BeforeValidator(_not_a_bool)] | None = Field(
        None, description="stop training after this long"
    )
    mode: Literal["incremental", "full"] | None = Field(
        None,
        description="'incremental': the log since the active version plus a replay sample; 'full': all history. "
        "Default: GRAMREC_RETRAIN__MODE (incremental)",
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"task": "kt", "epochs": 1, "time_budget_s": 600, "mode": "incremental"}]},
    )


JobStatus = Literal["queued", "running", "succeeded", "failed", "rejected"]


class Job(BaseModel):
    """A retrain job record. `rejected`: trained, but the gate kept the active model."""

    id: str
    kind: Literal["retrain"] = "retrain"
    status: JobStatus
    task: Task
    trigger: Literal["admin", "schedule", "volume"] = "admin"
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    params: dict = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    metrics: dict = Field(default_factory=dict, description="gate: new and active metric on the held-out slice")
    data: dict = Field(default_factory=dict, description="the training snapshot: items, interactions, dropped")
    base_version: str | None = Field(None, description="the active version it started from")
    version: str | None = Field(None, description="the version it exported")
    error: str | None = None
    worker: str | None = None

    @classmethod
    def queued(cls, task: str, trigger: str, params: dict) -> dict:
        """A new queued job record, as the API and the trainer's scheduler both queue them."""
        job = cls(
            id=uuid.uuid4().hex,
            status="queued",
            task=task,
            trigger=trigger,
            created_at=datetime.now(UTC).isoformat(),
            params=params,
        )
        return job.model_dump()


class JobReply(Job):
    """A job, and whether any trainer is alive to run it (trainers publish a heartbeat in the store)."""

    trainers_alive: int = Field(description="trainers whose heartbeat is fresh (`gramrec trainer` processes)")
    warning: str | None = Field(None, description="set when no trainer is alive: a queued job would wait forever")


class JobsResponse(BaseModel):
    jobs: list[Job] = Field(description="newest first")


class ModelInfo(BaseModel):
    version: str
    task: str
    strategy: str | None = None
    created_at: str | None = None
    metrics: dict | None = None
    active: bool


class ModelsResponse(BaseModel):
    active: dict[str, str | None] = Field(description="active version per task")
    models: list[ModelInfo] = Field(description="exported versions, newest first")


class ActivateResponse(BaseModel):
    task: str
    model_version: str


# -- health ----------------------------------------------------------------------------------------------------------
class LoadError(BaseModel):
    version: str
    error: str


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: dict[str, str]
    load_errors: dict[str, LoadError] = Field(
        default_factory=dict, description="task -> newest version that failed to load (the previous one serves)"
    )
