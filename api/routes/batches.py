"""The Batch API: `/v1/batches`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.batches.service import BatchCreate
from api.deps import BatchesDep, PrincipalDep
from api.openapi import error_responses
from common.batches import BatchList, BatchObject

router = APIRouter()


@router.post(
    "/v1/batches",
    responses=error_responses(400, 404, 413, 503, e404="The input file does not exist (or belongs to another key)."),
)
async def create_batch(body: BatchCreate, batches: BatchesDep, caller: PrincipalDep) -> BatchObject:
    return await batches.create(body, caller)


@router.get("/v1/batches/{batch_id}", responses=error_responses(404, 503))
async def retrieve_batch(batch_id: str, batches: BatchesDep, caller: PrincipalDep) -> BatchObject:
    return await batches.get(batch_id, caller)


@router.get("/v1/batches", responses=error_responses(400, 503))
async def list_batches(
    batches: BatchesDep,
    caller: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    data = await batches.list_batches(caller, after, limit + 1)
    page = data[:limit]
    return BatchList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(data) > limit,
    )


@router.post(
    "/v1/batches/{batch_id}/cancel",
    responses=error_responses(404, 409, 503, e409="The batch has already ended."),
)
async def cancel_batch(batch_id: str, batches: BatchesDep, caller: PrincipalDep) -> BatchObject:
    return await batches.cancel(batch_id, caller)
