"""Job and chunk-event schemas: what the API hands a worker and what comes back.

A Celery task carries only the job id. The request itself (prompt token ids and
sampling parameters) sits in the job record in Redis, so prompts never reach the
broker or Flower. Workers answer with `ChunkEvent`s on the job's pub/sub channel.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from common.keys import text
from common.schemas import Usage


class JobStatus(enum.StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class SamplingSpec(BaseModel):
    """Engine-neutral sampling parameters; the engine adapter maps them to its own."""

    n: int = 1
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0


class JobRequest(BaseModel):
    prompt_token_ids: list[int]
    sampling: SamplingSpec


def new_job_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class JobOptions(BaseModel):
    """How the job was asked for; a resumed stream behaves like the original."""

    stream: bool = False
    include_usage: bool = False
    background: bool = False


class ChoiceResult(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None


class JobResult(BaseModel):
    choices: list[ChoiceResult]


class JobRecord(BaseModel):
    """The job record, stored as a Redis hash (one field per attribute)."""

    id: str
    model: str
    status: JobStatus = JobStatus.queued
    created: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    attempt: int = 0
    requeued: float | None = None
    # When the job last entered the queue, and by when it must have started.
    queued_at: float | None = None
    deadline: float | None = None
    # The running attempt's lease (renewed by its worker) and the token of its claim.
    lease: float | None = None
    claim: str | None = None
    # The attempt the reaper took back (makes a retried reap answer the same).
    reaped: int | None = None
    # How often the sweeper re-sent its message, and when it may next.
    resends: int = 0
    resend_at: float | None = None
    cancel_requested: bool = False
    request: JobRequest | None = None
    options: JobOptions = Field(default_factory=JobOptions)
    usage: Usage | None = None
    result: JobResult | None = None
    error: dict[str, Any] | None = None
    # The id of the API key that created it (its batch's, for a batch line); "" when open.
    owner: str = ""
    # Set on the jobs of a batch: which batch, and the line's custom_id.
    batch: str | None = None
    custom_id: str | None = None

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_redis(cls, data: dict[Any, Any]) -> JobRecord:
        fields: dict[str, Any] = {}
        for raw_key, raw in data.items():
            key, value = text(raw_key), text(raw)
            if key in ("id", "model", "status", "worker", "batch", "custom_id", "claim", "owner"):
                fields[key] = value
            else:
                fields[key] = json.loads(value)
        return cls.model_validate(fields)


EventKind = Literal["delta", "done", "error"]


class ChoiceDelta(BaseModel):
    index: int
    text: str = ""
    # The tokens behind `text`: a new attempt continues from them.
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str | None = None


class ChunkEvent(BaseModel):
    """One message on a job's channel. `seq` counts from 0 without gaps per job."""

    seq: int
    kind: EventKind
    attempt: int = 1
    choices: list[ChoiceDelta] = Field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None

    def encode(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def decode(cls, raw: str | bytes) -> ChunkEvent:
        return cls.model_validate_json(raw)


class WorkerInfo(BaseModel):
    id: str
    model: str
    slots: int
    started: float
    # Jobs it holds right now (refreshed by its heartbeat).
    inflight: int = 0
    # Where its Prometheus metrics are served (http://host:port/metrics), if anywhere.
    metrics_url: str | None = None


class ModelCard(BaseModel):
    """What the API needs to validate requests for a model before queueing them."""

    name: str
    max_model_len: int
    tokenizer_digest: str
    created: int
