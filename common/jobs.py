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
from pydantic_core import to_json

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
    """Engine-neutral sampling parameters; the engine adapter maps them to its own. The
    knobs a client did not set stay None: the engine then applies the model's own
    defaults (its generation config) and OpenAI's, as `vllm serve` does."""

    n: int = 1
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


class OutputSpec(BaseModel):
    """A job answered in OpenAI's richer shapes (tools, structured output, reasoning,
    logprobs, echo): the worker's engine builds vLLM's own protocol request from `body`
    (vLLM's `ChatCompletionRequest` / `CompletionRequest`: its SamplingParams, structured
    outputs and parsers), so the answer is what `vllm serve` would give. Absent on plain
    text jobs, which take the lean path (`SamplingSpec` alone)."""

    api: Literal["chat", "completion"] = "chat"
    # The OpenAI request as validated by the API: every field the client sent except the
    # prompt itself (`messages`/`prompt`, already in the token ids) and llmq's own
    # (`background`); `max_tokens` is the resolved per-choice budget.
    body: dict[str, Any] = Field(default_factory=dict)
    # Completions with `echo`: each prompt as text, prepended to its choices' text.
    echo_texts: list[str] | None = None


class JobRequest(BaseModel):
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    # Completions with several prompts: the second and later ones. Choice index
    # `p * n + j` is the j-th sample of prompt p (as vLLM and OpenAI number them).
    more_prompts: list[list[int]] | None = None
    output: OutputSpec | None = None

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt_token_ids, *(self.more_prompts or [])]

    @property
    def choices(self) -> int:
        """How many choices the answer has."""
        return self.sampling.n * (1 + len(self.more_prompts or []))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids) + sum(len(p) for p in self.more_prompts or [])

    @property
    def continuable(self) -> bool:
        """A new attempt (the worker was lost) may continue from the tokens sent; else
        it starts over (several choices, or parser and grammar state that cannot be
        resumed from text)."""
        return self.choices == 1 and self.output is None


def new_job_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class JobOptions(BaseModel):
    """How the job was asked for; a resumed stream behaves like the original."""

    stream: bool = False
    include_usage: bool = False
    background: bool = False


class ChoiceResult(BaseModel):
    index: int
    # The text (for a chat job: the content; for a completion: echo included).
    text: str
    finish_reason: str | None = None
    # Rich chat jobs: the whole message as vLLM's parser reads the finished output
    # (`content` (str | None), `reasoning` (str | None), `tool_calls` (OpenAI tool calls)).
    message: dict[str, Any] | None = None
    # The choice's logprobs in the API's wire shape (see ChoiceDelta.logprobs).
    logprobs: dict[str, Any] | None = None
    # vLLM's extensions: what stopped it, and (completions) its prompt's logprobs.
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


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
    # A Responses API job (`resp_...`): what the response object adds to its chat job
    # (common.responses.ResponseMeta). Removed when the response is deleted.
    response: dict[str, Any] | None = None
    # An ended response's object, kept once it has been read (so a GET does not replay
    # the whole log again).
    response_final: dict[str, Any] | None = None

    def to_redis(self) -> dict[str, str]:
        """One hash field per attribute: strings as they are, the rest as compact JSON
        (pydantic-core's encoder: 7 us a record where `json.dumps` per field took 18)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            out[key] = value if isinstance(value, str) else to_json(value, inf_nan_mode="constants").decode()
        return out

    @classmethod
    def from_redis(cls, data: dict[Any, Any]) -> JobRecord:
        """The record from its hash: the fields joined into one JSON document (the string
        fields quoted) and validated from that in one pass (11 us a record where a
        `json.loads` per field and a validation of the result took 21)."""
        parts = []
        for raw_key, raw in data.items():
            key, value = text(raw_key), text(raw)
            parts.append(f"{_json_text(key)}:{_json_text(value) if key in _TEXT_FIELDS else value}")
        return cls.model_validate_json("{" + ",".join(parts) + "}")


# The record's fields stored as plain text (every other field is JSON).
_TEXT_FIELDS = frozenset({"id", "model", "status", "worker", "batch", "custom_id", "claim", "owner"})
_json_text = json.JSONEncoder().encode


EventKind = Literal["delta", "done", "error"]


class ChoiceDelta(BaseModel):
    index: int
    # New text: for a rich chat job the content part only (after vLLM's parsers).
    text: str = ""
    # The tokens behind `text`: a new attempt continues from them.
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str | None = None
    # Rich chat jobs (OutputSpec): reasoning text, and tool-call deltas exactly as OpenAI
    # streams them ({"index", "id", "type", "function": {"name", "arguments"}}).
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # Logprobs of this delta's tokens in the API's wire shape: chat {"content": [...]},
    # completion {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (lists,
    # concatenated when deltas merge).
    logprobs: dict[str, Any] | None = None
    # The last delta of a rich chat choice: its whole message (ChoiceResult.message).
    # The worker keeps it for the job's result; it is never published.
    message: dict[str, Any] | None = None
    # vLLM's extension on a finished choice: the stop string (or token id) that ended it.
    stop_reason: str | int | None = None
    # Completions with echo (or prompt_logprobs): on a choice's first delta, its prompt's
    # token ids (vLLM streams them with the echo) and its prompt logprobs (vLLM's shape: per
    # prompt token None or {token id: {logprob, rank, decoded_token}}; the result's, never
    # published, as `message`).
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None

    def extend(self, more: ChoiceDelta) -> None:
        """Append a later delta of the same choice: text, tokens and logprobs follow on,
        tool-call deltas merge by their index (a fragment of arguments joins the call it
        belongs to, as an OpenAI client merges them), the finish reason is the latest."""
        self.text += more.text
        self.token_ids.extend(more.token_ids)
        self.finish_reason = more.finish_reason or self.finish_reason
        if more.reasoning:
            self.reasoning = (self.reasoning or "") + more.reasoning
        if more.tool_calls:
            self.tool_calls = merge_tool_call_deltas(self.tool_calls or [], more.tool_calls)
        if more.logprobs:
            self.logprobs = extend_logprobs(self.logprobs, more.logprobs)
        if more.message is not None:
            self.message = more.message
        if more.stop_reason is not None:
            self.stop_reason = more.stop_reason
        if more.prompt_token_ids is not None and self.prompt_token_ids is None:
            self.prompt_token_ids = more.prompt_token_ids
        if more.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = more.prompt_logprobs


def merge_tool_call_deltas(into: list[dict[str, Any]], more: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call deltas as one: per call index, the first id, type and name, and the
    arguments fragments joined in order."""
    out = [dict(c, function=dict(c.get("function") or {})) for c in into]
    by_index = {c["index"]: c for c in out}
    for call in more:
        have = by_index.get(call["index"])
        if have is None:
            have = dict(call, function=dict(call.get("function") or {}))
            by_index[call["index"]] = have
            out.append(have)
            continue
        for key in ("id", "type"):
            if call.get(key) and not have.get(key):
                have[key] = call[key]
        fn = call.get("function") or {}
        if fn.get("name") and not have["function"].get("name"):
            have["function"]["name"] = fn["name"]
        if fn.get("arguments"):
            have["function"]["arguments"] = (have["function"].get("arguments") or "") + fn["arguments"]
    return out


def extend_logprobs(into: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Logprobs of consecutive tokens as one: every list in the wire shape concatenated.
    `into` (owned by the caller) grows in place, so gathering a long answer's logprobs
    step by step costs its length, not its square (16k tokens: 0.7 s of the worker's
    loop, copied per step); `more` is copied, never kept."""
    if into is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in more.items()}
    for key, value in more.items():
        if isinstance(value, list):
            have = into.get(key)
            if isinstance(have, list):
                have.extend(value)
            else:
                into[key] = list(value)
        elif key not in into:
            into[key] = value
    return into


class ChunkEvent(BaseModel):
    """One message on a job's channel. `seq` counts from 0 without gaps per job."""

    seq: int
    kind: EventKind
    attempt: int = 1
    choices: list[ChoiceDelta] = Field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None
    # On a worker's last event: the job record's `started` (its claim), so that a reader
    # observes the queue wait without reading the record (a round trip a job, issue 12).
    started: float | None = None

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
    # The weights' data type the workers run ("bfloat16", "float32"; "fake" for the fake
    # engine): for operators and benchmarks.
    dtype: str | None = None
    created: int
    # What the workers of this model can do (as `vllm serve`'s --tool-call-parser,
    # --enable-auto-tool-choice, --reasoning-parser): the API refuses what they cannot.
    tool_call_parser: str | None = None
    auto_tool_choice: bool = False
    reasoning_parser: str | None = None
