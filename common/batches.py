"""OpenAI Files and Batch API objects, and the batch record kept in Redis."""

from __future__ import annotations

import enum
import json
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, PrivateAttr

from common.keys import text


class Owned(BaseModel):
    """An object that belongs to an API key (its id); the owner is not part of the API's
    object, only of its record."""

    _owner: str = PrivateAttr(default="")

    @property
    def owner(self) -> str:
        return self._owner

    def owned_by(self, owner: str) -> Self:
        self._owner = owner
        return self


class FileObject(Owned):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    def to_redis(self) -> dict[str, str]:
        out = {k: json.dumps(v) for k, v in self.model_dump().items()}
        out["owner"] = json.dumps(self._owner)
        return out

    @classmethod
    def from_redis(cls, data: dict[Any, Any]) -> FileObject:
        fields = {text(k): json.loads(v) for k, v in data.items()}
        owner = fields.pop("owner", "")
        return cls.model_validate(fields).owned_by(owner)


class BatchStatus(enum.StrEnum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.failed, BatchStatus.completed, BatchStatus.expired, BatchStatus.cancelled)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(Owned):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


# Batch record fields that are plain strings in the Redis hash; the rest are JSON.
_PLAIN = {"id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id"}
# Counters: `total`, `dispatched` (lines handed out, a high-water mark) and `handing`
# (lines whose records may exist: raised before a group's are written) live in the
# record; the ended lines are counted from the batch's per-status sets (`ended`), until
# the batch ends and its final counts are written into the record.
COUNTERS = ("total", "completed", "failed", "cancelled", "dispatched")
ENDED = ("completed", "failed", "cancelled")


def batch_to_redis(batch: BatchObject) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in batch.model_dump(mode="json", exclude={"request_counts"}).items():
        if value is None:
            continue
        out[key] = value if key in _PLAIN else json.dumps(value)
    out["owner"] = batch.owner
    return out


def batch_from_redis(data: dict[Any, Any], ended: dict[str, int] | None = None) -> tuple[BatchObject, dict[str, int]]:
    """The batch object, and its counters (including `dispatched`: lines handed out).
    `ended`: the sizes of its per-status sets, used while the batch runs."""
    fields: dict[str, Any] = {}
    owner = ""
    counters = dict.fromkeys(COUNTERS, 0)
    for raw_key, raw in data.items():
        key, value = text(raw_key), text(raw)
        if key.startswith("n_"):
            counters[key[2:]] = int(value)
        elif key == "owner":
            owner = value
        elif key in _PLAIN:
            fields[key] = value
        elif key in BatchObject.model_fields:
            fields[key] = json.loads(value)
    # Once the batch has ended, the counts its end wrote into the record stand (lines
    # never run count as failed there).
    if ended is not None and not BatchStatus(fields["status"]).terminal:
        counters.update(ended)
    fields["request_counts"] = RequestCounts(
        total=counters["total"], completed=counters["completed"], failed=counters["failed"]
    )
    return BatchObject.model_validate(fields).owned_by(owner), counters


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
