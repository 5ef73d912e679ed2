"""Admin API (bearer token): queue retrains, follow jobs, list model versions, activate one (roll back or forward).

POST /admin/retrain only records the job and queues it; `gramrec trainer` (trainer/retrain/worker.py) runs it. A trigger
while the task already has a job waiting joins that job (202 with the same id) instead of queuing another.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from gramrec.service.auth import require_admin
from gramrec.service.deps import get_registry, get_store
from gramrec.service.registry import ModelRegistry
from gramrec.service.schemas import (
    ActivateResponse,
    Job,
    JobReply,
    JobsResponse,
    ModelInfo,
    ModelsResponse,
    RetrainRequest,
)
from gramrec.service.settings import TASKS, VERSION_PATTERN
from gramrec.service.store import STORE_ERRORS, Store
from gramrec.service.store.beacons import TRAINERS

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={401: {"description": "missing or invalid bearer token"}, 403: {"description": "admin API disabled"}},
)

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


NO_TRAINER = "no trainer is alive (no heartbeat in the store): queued jobs wait until `gramrec trainer` runs"


def with_trainers(record: dict, store: Store) -> JobReply:
    """The job and how many trainers are alive; a warning when a job that still has to run has none."""
    try:
        alive = len(store.beacons(TRAINERS))
    except STORE_ERRORS:
        alive = 0
    waiting = record.get("status") in ("queued", "running")
    return JobReply.model_validate(
        record | {"trainers_alive": alive, "warning": NO_TRAINER if waiting and not alive else None}
    )


@router.post("/retrain", status_code=status.HTTP_202_ACCEPTED)
def queue_retrain(body: RetrainRequest, store: Annotated[Store, Depends(get_store)]) -> JobReply:
    params = body.model_dump(exclude={"task"}, exclude_none=True)
    return with_trainers(store.enqueue_job(Job.queued(body.task, "admin", params)), store)


@router.get("/jobs")
def list_jobs(
    store: Annotated[Store, Depends(get_store)], limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> JobsResponse:
    return JobsResponse(jobs=[Job.model_validate(record) for record in store.list_jobs(limit)])


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def get_job(
    job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)], store: Annotated[Store, Depends(get_store)]
) -> JobReply:
    record = store.get_job(job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return with_trainers(record, store)


@router.get("/models")
def list_models(
    registry: Annotated[ModelRegistry, Depends(get_registry)], store: Annotated[Store, Depends(get_store)]
) -> ModelsResponse:
    active = {task: store.active_version(task) for task in TASKS}
    models = [
        ModelInfo(
            version=m["version"],
            task=m["task"],
            strategy=m.get("strategy"),
            created_at=m.get("created"),
            metrics=m.get("metrics"),
            active=active.get(m["task"]) == m["version"],
        )
        for m in registry.versions()
    ]
    return ModelsResponse(active=active, models=models)


@router.post(
    "/models/{version}/activate",
    responses={
        404: {"description": "no such version"},
        409: {"description": "concurrent activation"},
        422: {"description": "the version does not load (bad checksum, malformed files)"},
    },
)
def activate(
    version: Annotated[str, Path(pattern=VERSION_PATTERN)], registry: Annotated[ModelRegistry, Depends(get_registry)]
) -> ActivateResponse:
    model = registry.activate(version)  # VersionNotFound 404, ArtifactError 422, ActivationConflict 409: http_errors.py
    return ActivateResponse(task=model.task, model_version=model.version)
