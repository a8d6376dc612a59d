"""The Files API: `/v1/files`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from api.files import FileStore
from common.batches import FileDeleted, FileList, FileObject

router = APIRouter()


def _files(request: Request) -> FileStore:
    return request.app.state.files  # type: ignore[no-any-return]


@router.post("/v1/files")
async def upload_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> FileObject:
    # The multipart parser spools the upload to a temporary file; it is copied on in pieces.
    return await _files(request).save(file.file, file.filename or "upload.jsonl", purpose)


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    data = await _files(request).list_files(purpose, limit, after, order)
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(data) == limit,
    )


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> FileObject:
    return await _files(request).get(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> FileResponse:
    store = _files(request)
    meta = await store.get(file_id)
    return FileResponse(store.path(file_id), media_type="application/octet-stream", filename=meta.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    return FileDeleted.model_validate(await _files(request).delete(file_id))
