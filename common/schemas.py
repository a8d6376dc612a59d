"""OpenAI wire schemas for chat completions, named as OpenAI names them."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError, PydanticSerializationError, to_json

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "error"]

# Integer bounds: nothing larger reaches the engine, JSON or Redis. A seed is a signed
# 64-bit integer (as OpenAI's and vLLM's); token counts fit 32 bits.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _children(value: Any) -> Iterator[tuple[Any, Any]] | None:
    if isinstance(value, dict):
        return iter(value.items())
    if isinstance(value, list | tuple):
        return enumerate(value)
    return None


def find_lone_surrogate(value: Any) -> str | None:
    """The path (`messages.0.content`, "" for `value` itself) of the first string or
    object key in parsed JSON holding a UTF-16 surrogate, which no UTF-8 text can carry
    (JSON can: `"\\ud800"`); None if there is none. Iterative: any depth."""
    if isinstance(value, str):
        return "" if _has_surrogate(value) else None
    try:
        to_json(value)  # fast, in Rust, and fails on a surrogate (or on what is not JSON)
        return None
    except PydanticSerializationError:
        pass
    root = _children(value)
    if root is None:
        return None
    path: list[str] = []
    stack = [root]
    while stack:
        for key, child in stack[-1]:
            if isinstance(key, str) and _has_surrogate(key):
                return ".".join([*path, _SURROGATE.sub("\ufffd", key)])
            if isinstance(child, str):
                if _has_surrogate(child):
                    return ".".join([*path, str(key)])
                continue
            below = _children(child)
            if below is not None:
                path.append(str(key))
                stack.append(below)
                break
        else:
            stack.pop()
            if path:
                path.pop()
    return None


# The documented schemas (OpenAPI) say exactly what the validators below accept; the
# checks themselves stay in the validators, whose messages clients see.
def _text_part_schema(schema: dict[str, Any]) -> None:
    schema["properties"]["type"] = {"const": "text", "type": "string", "title": "Type"}
    schema["properties"]["text"] = {"type": "string", "title": "Text"}
    schema["required"] = ["type", "text"]


def _message_schema(schema: dict[str, Any]) -> None:
    # Content is required, except in an assistant message carrying tool calls.
    schema["anyOf"] = [
        {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
        {
            "required": ["role", "tool_calls"],
            "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}},
        },
    ]


def _request_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    props["stop"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
            {"type": "null"},
        ],
        "title": "Stop",
        "description": "Up to 16 non-empty stop sequences.",
    }
    props["logprobs"] = {"enum": [False, None], "title": "Logprobs", "description": "Not supported."}
    props["top_logprobs"] = {"enum": [0, None], "title": "Top Logprobs", "description": "Not supported."}
    schema["allOf"] = [
        # stream_options only with stream: true.
        {
            "anyOf": [
                {"required": ["stream"], "properties": {"stream": {"const": True}}},
                {"properties": {"stream_options": {"type": "null"}}},
            ]
        },
        # No tool calling: tools only with tool_choice "none" (or none at all).
        {
            "anyOf": [
                {"properties": {"tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
                {"properties": {"tool_choice": {"enum": [None, "none"]}}},
            ]
        },
    ]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_text_part_schema)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_message_schema)
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"content part of type {part.type!r} is not supported")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def text_chars(self) -> int:
        """Characters of what the chat template renders from this message."""
        chars = len(self.text()) + len(self.name or "") + len(self.tool_call_id or "")
        return chars + (len(json.dumps(self.tool_calls, ensure_ascii=False, default=str)) if self.tool_calls else 0)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (plain string content)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        out["content"] = self.text()
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(json_schema_extra={"const": "text"}, description="Only `text` is supported.")


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown fields are accepted and ignored, as clients
    such as chat front ends send extras (user, metadata, ...). `min_tokens` must not
    exceed the (resolved) `max_tokens`, and the prompt plus `max_tokens` must fit the
    model's context."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_request_schema)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(default=1, ge=1, le=INT32_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Answer at once with the queued job; fetch it later (GET /v1/chat/completions/{id}).
    background: bool = False
    # vLLM extensions, handy for benchmarks and evaluation harnesses.
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    # Accepted only in the forms this service can honour (checked below).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """No string anywhere (extras included) may hold a lone surrogate: no tokenizer,
        Redis or JSON response can encode it. The error names the field."""
        param = find_lone_surrogate(data)
        if param is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "the string holds a lone UTF-16 surrogate, which is not valid Unicode",
                {"param": param},
            )
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list):
            return stops  # let the type check say what is wrong
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this service")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format {self.response_format.type!r} is not supported")
        if self.tool_choice not in (None, "none") and self.tools:
            raise ValueError("tool calling is not supported by this service; use tool_choice 'none'")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletionJob(BaseModel):
    """A chat completion job as `GET /v1/chat/completions/{id}` shows it: a
    `chat.completion` (choices and usage once it has ended) with the job's own fields."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    background: bool = False
    attempt: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmq"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
