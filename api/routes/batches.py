"""The Batch API: `/v1/batches`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.batches.service import BatchCreate
from api.deps import BatchesDep
from common.batches import BatchList, BatchObject

router = APIRouter()


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, batches: BatchesDep) -> BatchObject:
    return await batches.create(body)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, batches: BatchesDep) -> BatchObject:
    return await batches.get(batch_id)


@router.get("/v1/batches")
async def list_batches(
    batches: BatchesDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> BatchList:
    data = await batches.list_batches(after, limit + 1)
    page = data[:limit]
    return BatchList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(data) > limit,
    )


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, batches: BatchesDep) -> BatchObject:
    return await batches.cancel(batch_id)
