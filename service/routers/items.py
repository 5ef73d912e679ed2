"""Items added at run time: POST /items encodes texts with the active encoder into the active table.

The texts are kept too (texts hash), so activating another version, or a retrain, can re-encode them.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from gramrec.service.deps import get_registry, get_store, require_model
from gramrec.service.limits import checked_items
from gramrec.service.registry import ActiveModel, ModelRegistry
from gramrec.service.schemas import AddItemsRequest, AddItemsResponse, ItemResponse, ItemsPage, ItemSummary
from gramrec.service.settings import ITEM_ID_PATTERN, Task
from gramrec.service.store import StaleVersion, Store

router = APIRouter(prefix="/items", tags=["items"])


def _require_encoder(model: ActiveModel) -> None:
    if not model.bundle.has_encoder:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"model {model.version} ({model.bundle.strategy}) has no content encoder: it cannot embed "
            "new items from text; activate a content-based version to add items",
        )


@router.post(
    "",
    responses={
        409: {"description": "the active model cannot encode text"},
        507: {"description": "the catalog index would pass GRAMREC_INDEX_MAX_BYTES"},
        503: {},
    },
)
def add_items(
    body: Annotated[AddItemsRequest, Depends(checked_items)],
    registry: Annotated[ModelRegistry, Depends(get_registry)],
    store: Annotated[Store, Depends(get_store)],
) -> AddItemsResponse:
    ids = [item.item_id for item in body.items]
    texts = [item.text for item in body.items]
    metadata = [item.metadata() for item in body.items]
    model = require_model(registry, body.task)
    for _attempt in range(2):
        _require_encoder(model)
        if model.index is not None:  # refused (507) before anything is stored when the index would pass its bound
            model.index.check_room(model.index.new_ids(ids))
        vectors = model.bundle.encode_texts(texts)
        try:
            store.put_items(body.task, model.version, ids, texts, vectors, model.bundle.dim, metadata)
            if model.index is not None:  # this process's /recommend sees them at once; others at their refresh
                model.index.upsert(ids, vectors, metadata)
            return AddItemsResponse(model_version=model.version, item_ids=ids)
        except StaleVersion as stale:
            # Another process activated a new version between our read and write: encode again with it.
            model = registry.refresh_after_stale(body.task, stale) or require_model(registry, body.task)
    raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the active model keeps changing; try again")


MAX_PAGE = 1000


@router.get("", responses={503: {"description": "no model for the task"}})
def list_items(
    task: Annotated[Task, Query(description="whose table to list")],
    registry: Annotated[ModelRegistry, Depends(get_registry)],
    store: Annotated[Store, Depends(get_store)],
    offset: Annotated[int, Query(ge=0, description="items to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page, at most {MAX_PAGE}")] = 100,
) -> ItemsPage:
    """Lists the task's active item table with paging: the model's own items (with their dataset text) in the
    model's order, then the items added through `POST /items`, by id."""
    model = require_model(registry, task)
    catalog = model.bundle.catalog_ids()
    added = store.texts(task)  # texts of items added through the API (few: they come one request at a time)
    known = set(catalog) if added else set()
    extra = sorted(item_id for item_id in added if item_id not in known)
    total = len(catalog) + len(extra)
    page: list[ItemSummary] = []
    for index in range(offset, min(offset + limit, total)):
        if index < len(catalog):
            item_id = catalog[index]
            text = added.get(item_id) or model.bundle.catalog_text(item_id)
            page.append(ItemSummary(item_id=item_id, text=text, source="api" if item_id in added else "model"))
        else:
            item_id = extra[index - len(catalog)]
            page.append(ItemSummary(item_id=item_id, text=added[item_id], source="api"))
    next_offset = offset + limit if offset + limit < total else None
    return ItemsPage(
        task=task,
        model_version=model.version,
        total=total,
        offset=offset,
        limit=limit,
        next_offset=next_offset,
        items=page,
    )


def _lookup(task: Task, item_id: str, registry: ModelRegistry, store: Store) -> ItemResponse | None:
    model = require_model(registry, task)
    text, vector = store.get_item(task, model.version, item_id)
    if vector is None:
        return None
    text = text if text is not None else model.bundle.catalog_text(item_id)  # the dataset's own items
    return ItemResponse(item_id=item_id, text=text, model_version=model.version, dim=model.bundle.dim)


@router.get("/{task}/{item_id}", responses={404: {"description": "no such item in the active table"}})
def get_item(
    task: Task,
    item_id: Annotated[str, Path(pattern=ITEM_ID_PATTERN)],
    registry: Annotated[ModelRegistry, Depends(get_registry)],
    store: Annotated[Store, Depends(get_store)],
) -> ItemResponse:
    item = _lookup(task, item_id, registry, store)
    if item is None:
        version = require_model(registry, task).version
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"item {item_id!r} not in the {task} table of {version}")
    return item


@router.get("/{item_id}", responses={404: {"description": "no such item in any served task's active table"}})
def find_item(
    item_id: Annotated[str, Path(pattern=ITEM_ID_PATTERN)],
    registry: Annotated[ModelRegistry, Depends(get_registry)],
    store: Annotated[Store, Depends(get_store)],
    task: Annotated[Task | None, Query(description="look only in this task's table")] = None,
) -> ItemResponse:
    """An item by id alone: item ids of the two tasks live in separate tables, so this looks in each (or `task`)."""
    tasks: list[Task] = [task] if task else [cast(Task, t) for t in registry.active()]
    for candidate in tasks:
        item = _lookup(candidate, item_id, registry, store)
        if item is not None:
            return item
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"item {item_id!r} not in the active table of {tasks}")
