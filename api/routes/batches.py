"""The Batch API: `/v1/batches`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.batches import BatchCreate, BatchService
from common.batches import BatchObject

router = APIRouter()


def _batches(request: Request) -> BatchService:
    return request.app.state.batches  # type: ignore[no-any-return]


@router.post("/v1/batches")
async def create_batch(request: Request, body: BatchCreate) -> BatchObject:
    return await _batches(request).create(body)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> BatchObject:
    return await _batches(request).get(batch_id)


@router.get("/v1/batches")
async def list_batches(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    data = await _batches(request).list_batches(after, limit + 1)
    page = data[:limit]
    return {
        "object": "list",
        "data": [b.model_dump() for b in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(data) > limit,
    }


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> BatchObject:
    return await _batches(request).cancel(batch_id)
