"""FileStore: the Files API's files, bytes on disk (a folder API processes and batch
runners share), metadata in Redis. Uploads are copied to disk in 1 MiB pieces, never
held in memory whole. Every file belongs to the API key that uploaded it (a batch's
output files to the batch's owner); another key is told it does not exist."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis

from api.auth import Principal
from common import keys
from common.batches import FileObject
from common.errors import InvalidRequestError, NotFoundError, ServiceError

PURPOSES = {"batch", "batch_output", "fine-tune", "assistants", "user_data", "evals"}
CHUNK = 1 << 20


class FileTooLargeError(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "file_too_large"


class FileNotFoundError_(NotFoundError):
    default_code = "file_not_found"


def _copy_limited(src: IO[bytes], dst: Path, limit: int) -> int:
    size = 0
    with open(dst, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise FileTooLargeError(f"files may be at most {limit} bytes")
            out.write(chunk)
    return size


class FileStore:
    def __init__(self, redis: aioredis.Redis, folder: Path, upload_max_bytes: int):
        self.redis = redis
        self.folder = folder
        self.upload_max = upload_max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.folder / Path(file_id).name

    async def save(self, src: IO[bytes], filename: str, purpose: str, owner: str) -> FileObject:
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"purpose must be one of {sorted(PURPOSES)}", param="purpose")
        file_id = f"file-{uuid.uuid4().hex}"
        part = self.folder / f".{file_id}.part"
        try:
            size = await asyncio.to_thread(_copy_limited, src, part, self.upload_max)
            os.replace(part, self.path(file_id))
        finally:
            part.unlink(missing_ok=True)
        return await self._register(file_id, filename, purpose, size, owner)

    async def adopt(self, tmp: Path, filename: str, purpose: str, owner: str) -> FileObject:
        """Register a file the service wrote itself (batch output) under a new id."""
        file_id = f"file-{uuid.uuid4().hex}"
        os.replace(tmp, self.path(file_id))
        return await self._register(file_id, filename, purpose, self.path(file_id).stat().st_size, owner)

    async def _register(self, file_id: str, filename: str, purpose: str, size: int, owner: str) -> FileObject:
        obj = FileObject(
            id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose
        ).owned_by(owner)
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.file(file_id), mapping=obj.to_redis())  # type: ignore[arg-type]
            pipe.zadd(keys.FILES, {file_id: now})
            pipe.zadd(keys.owned_files(owner), {file_id: now})
            await pipe.execute()
        return obj

    async def get(self, file_id: str, caller: Principal) -> FileObject:
        raw = await self.redis.hgetall(keys.file(file_id))
        obj = FileObject.from_redis(raw) if raw else None
        if obj is None or not caller.owns(obj.owner):
            raise FileNotFoundError_(f"No such File object: {file_id}", param="file_id")
        return obj

    async def list_files(
        self, caller: Principal, purpose: str | None, limit: int, after: str | None, order: str
    ) -> list[FileObject]:
        index = keys.FILES if caller.admin else keys.owned_files(caller.key_id)
        ids = await self.redis.zrange(index, 0, -1, desc=(order == "desc"))
        names = [keys.text(i) for i in ids]
        if after is not None and after in names:
            names = names[names.index(after) + 1 :]
        out: list[FileObject] = []
        for file_id in names:
            if len(out) >= limit:
                break
            raw = await self.redis.hgetall(keys.file(file_id))
            if raw:
                obj = FileObject.from_redis(raw)
                if purpose is None or obj.purpose == purpose:
                    out.append(obj)
        return out

    async def delete(self, file_id: str, caller: Principal) -> dict[str, Any]:
        obj = await self.get(file_id, caller)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file(file_id))
            pipe.zrem(keys.FILES, file_id)
            pipe.zrem(keys.owned_files(obj.owner), file_id)
            await pipe.execute()
        self.path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def open(self, file_id: str) -> IO[bytes]:
        return open(self.path(file_id), "rb")
