"""The Files API: `/v1/files`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from api.deps import PrincipalDep
from api.files import PURPOSES, FileStore
from api.openapi import error_responses
from common.batches import FileDeleted, FileList, FileObject

router = APIRouter()


def _files(request: Request) -> FileStore:
    return request.app.state.files  # type: ignore[no-any-return]


@router.post("/v1/files", responses=error_responses(400, 413, 503))
async def upload_file(
    request: Request,
    caller: PrincipalDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(json_schema_extra={"enum": sorted(PURPOSES)})],
) -> FileObject:
    # The multipart parser spools the upload to a temporary file; it is copied on in pieces.
    return await _files(request).save(file.file, file.filename or "upload.jsonl", purpose, caller.key_id)


@router.get("/v1/files", responses=error_responses(400, 503))
async def list_files(
    request: Request,
    caller: PrincipalDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    data = await _files(request).list_files(caller, purpose, limit, after, order)
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(data) == limit,
    )


@router.get("/v1/files/{file_id}", responses=error_responses(404, 503))
async def retrieve_file(request: Request, file_id: str, caller: PrincipalDep) -> FileObject:
    return await _files(request).get(file_id, caller)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file's bytes.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(404, 503),
    },
)
async def file_content(request: Request, file_id: str, caller: PrincipalDep) -> FileResponse:
    store = _files(request)
    meta = await store.get(file_id, caller)
    return FileResponse(store.path(file_id), media_type="application/octet-stream", filename=meta.filename)


@router.delete("/v1/files/{file_id}", responses=error_responses(404, 503))
async def delete_file(request: Request, file_id: str, caller: PrincipalDep) -> FileDeleted:
    return FileDeleted.model_validate(await _files(request).delete(file_id, caller))
