"""OpenAI's Responses API on the job queue: the request (`ResponsesRequest`), how it
becomes a chat job (input items and `previous_response_id` history as chat messages,
function tools and `text.format` in chat's shapes), and how a job's events become
Responses events and objects (`ResponseTranslator`).

A response is a chat job whose id starts with `resp_`; what the Responses API adds (its
instructions, tools, metadata, input items, the conversation before it) is kept in the
job record (`JobRecord.response`, a `ResponseMeta`). The events a client sees are a pure
function of the job's replay log: every reader, live or resumed, from any API process,
gets the same events with the same `sequence_number`s, so `starting_after=N` resumes
exactly after event N. Item ids are derived from the response id and the item's output
index, so they too are the same on every replay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.schemas import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_STOP,
    _nullable,
    _valid_unicode,
    drop_nulls_and_refuse,
    param_error,
)

RESPONSE_PREFIX = "resp_"


def new_response_id() -> str:
    return f"{RESPONSE_PREFIX}{uuid.uuid4().hex}"


# Fields of OpenAI's request that change the answer and that this service does not
# support: a 400 naming them unless absent, null, or one of these values.
REFUSED_RESPONSES: dict[str, tuple[Any, ...]] = {
    "conversation": (),
    "prompt": (),
    "include": ([],),
    "top_logprobs": (0,),
    "truncation": ("disabled",),
    "max_tool_calls": (),
    "context_management": (),
    "background_options": (),
    "image": (),
    "moderation": (),
    "access_programs": (),
}
# Tool types of OpenAI's that run on its servers (none here), named in the 400.
FUNCTION_TOOL = "function"
# The sampling extensions (vLLM's, as on chat) a Responses request may also carry.
PASSED_THROUGH = (
    "seed",
    "top_k",
    "min_p",
    "stop",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
MAX_METADATA_KEYS = 16


# -- the documented request schema (OpenAPI) ------------------------------------------
# It says exactly what the validators accept: ResponsesRequest's, `normalize_input`'s and
# those of the chat request that answers it (`chat_body`: a tool's name of at most 256
# characters, a description a string, stop sequences as chat's, at least one message).
# The checks stay in the validators, whose messages clients see. Inside input items,
# tools and formats nothing is nullable that the validators do not read as absent.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _parts_schema() -> dict[str, Any]:
    """Content parts (`_text_of`): text parts with their `text`, or refusals."""
    return {
        "type": "array",
        "items": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["type", "text"],
                    "properties": {"type": {"enum": list(_TEXT_PARTS)}, "text": {"type": "string"}},
                },
                {
                    "type": "object",
                    "required": ["type", "refusal"],
                    "properties": {"type": {"const": "refusal"}, "refusal": {"type": "string"}},
                },
            ]
        },
    }


def _input_item_schema() -> dict[str, Any]:
    """An input item `normalize_input` takes."""
    text = {"anyOf": [{"type": "string"}, _parts_schema()]}
    return {
        "oneOf": [
            {
                "title": "Message",
                "description": "A message (`type` may be left out).",
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "type": {"const": "message"},
                    "role": {"enum": ["user", "system", "developer", "assistant"]},
                    "content": text,
                },
            },
            {
                "title": "FunctionCall",
                "type": "object",
                "required": ["type", "call_id", "name", "arguments"],
                "properties": {
                    "type": {"const": "function_call"},
                    "call_id": {"type": "string"},
                    "name": {"type": "string"},
                    "arguments": {"type": "string"},
                },
            },
            {
                "title": "FunctionCallOutput",
                "type": "object",
                "required": ["type", "call_id", "output"],
                "properties": {
                    "type": {"const": "function_call_output"},
                    "call_id": {"type": "string"},
                    "output": text,
                },
            },
            {
                "title": "Reasoning",
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"const": "reasoning"},
                    "content": {"type": ["array", "null"]},
                    "summary": {"type": ["array", "null"]},
                },
            },
        ]
    }


def _responses_request_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    props["input"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": _input_item_schema()},
        ],
        "title": "Input",
        "description": "A string (one user message) or input items: messages (text only), function calls, "
        "their outputs, reasoning.",
    }
    props["tools"] = {
        "type": "array",
        "maxItems": 128,
        "items": {
            "type": "object",
            "required": ["type", "name"],
            "properties": {
                "type": {"const": FUNCTION_TOOL},
                "name": {"type": "string", "minLength": 1, "maxLength": 256},
                "description": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"]},
                "strict": {"type": ["boolean", "null"]},
            },
        },
        "title": "Tools",
        "description": "Function tools only.",
    }
    props["tool_choice"] = {
        "anyOf": [
            {"enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "required": ["type", "name"],
                "properties": {
                    "type": {"const": FUNCTION_TOOL},
                    "name": {"type": "string", "minLength": 1, "maxLength": 256},
                },
            },
        ],
        "title": "Tool Choice",
        "description": "`required` and a named function need tools; a named function must be one of `tools`. "
        "As on chat, `auto` needs ENABLE_AUTO_TOOL_CHOICE and TOOL_CALL_PARSER on the model's workers, "
        "`required` and a named function TOOL_CALL_PARSER.",
    }
    props["text"] = {
        "type": "object",
        "properties": {
            "format": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"enum": ["text", "json_object"]}},
                    },
                    {
                        "type": "object",
                        "required": ["type", "name", "schema"],
                        "properties": {
                            "type": {"const": "json_schema"},
                            "name": {"type": "string", "minLength": 1},
                            "schema": {"type": "object"},
                            "description": {"type": ["string", "null"]},
                            "strict": {"type": ["boolean", "null"]},
                        },
                    },
                    {"type": "null"},
                ]
            }
        },
        "title": "Text",
    }
    props["reasoning"] = {
        "type": "object",
        "properties": {"effort": {"enum": [*REASONING_EFFORTS, None]}},
        "title": "Reasoning",
    }
    props["metadata"] = {
        "type": "object",
        "maxProperties": MAX_METADATA_KEYS,
        "propertyNames": {"maxLength": 64},
        "additionalProperties": {"type": "string", "maxLength": 512},
        "title": "Metadata",
        "description": f"Up to {MAX_METADATA_KEYS} string values (keys up to 64 characters, values up to 512).",
    }
    props["stop"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
        ],
        "title": "Stop",
        "description": f"Up to {MAX_STOP} non-empty stop sequences (as OpenAI and vLLM).",
    }
    for name, allowed in REFUSED_RESPONSES.items():
        props[name] = {"enum": list(allowed), "title": name, "description": "Not supported (only its default)."}
    for name in list(props):
        if name not in schema.get("required", []):
            props[name] = _nullable(props[name])
    schema["allOf"] = [
        # background: true only if stored.
        {
            "anyOf": [
                {"properties": {"background": {"enum": [False, None]}}},
                {"properties": {"store": {"enum": [True, None]}}},
            ]
        },
        # required or a named function needs tools.
        {
            "anyOf": [
                {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
            ]
        },
        # At least one chat message: an item other than reasoning, instructions, or the
        # conversation of `previous_response_id`.
        {
            "anyOf": [
                {"properties": {"input": {"type": "string"}}},
                {
                    "properties": {
                        "input": {
                            "contains": {"not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}
                        }
                    }
                },
                {"required": ["instructions"], "properties": {"instructions": {"type": "string", "minLength": 1}}},
                {"required": ["previous_response_id"], "properties": {"previous_response_id": {"type": "string"}}},
            ]
        },
    ]


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`. OpenAI's `null` means "not given"; unknown fields are
    ignored (user, service_tier, safety_identifier, prompt_cache_key, ...); built-in
    tools, files, images, prompt templates, conversations and `include` are refused with
    a 400 naming them."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_responses_request_schema)

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    user: str | None = None
    # vLLM's sampling extensions (as on chat).
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        return drop_nulls_and_refuse(_valid_unicode(data), REFUSED_RESPONSES)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if value == "" or value == []:
            raise ValueError("input must not be empty")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata may hold at most {MAX_METADATA_KEYS} keys")
        for key, item in value.items():
            if len(key) > 64:
                raise ValueError("metadata keys may be at most 64 characters")
            if len(item) > 512:
                raise ValueError("metadata values may be at most 512 characters")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        normalize_input(self.input, "")  # every item is one this service takes (400s name the item)
        if self.background and not self.store:
            raise param_error("background", "background responses must be stored: store must not be false")
        for i, tool in enumerate(self.tools or []):
            kind = tool.get("type")
            if kind != FUNCTION_TOOL:
                raise param_error(
                    f"tools.{i}.type",
                    f"tool type {kind!r} is not supported by this service; only function tools are",
                )
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise param_error(f"tools.{i}.name", "a function tool needs a name")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise param_error(f"tools.{i}.parameters", "parameters must be a JSON schema object")
            if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
                raise param_error(f"tools.{i}.strict", "strict must be a boolean")
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != FUNCTION_TOOL or not isinstance(choice.get("name"), str):
                raise param_error(
                    "tool_choice", "tool_choice must be none, auto, required or {type: function, name: ...}"
                )
            if choice["name"] not in {t.get("name") for t in self.tools or []}:
                raise param_error("tool_choice", "The tool specified in tool_choice does not match any of the tools")
        elif choice in ("required",) and not self.tools:
            raise param_error("tool_choice", "When using tool_choice, tools must be set")
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                raise param_error("text.format.type", f"text format {kind!r} is not supported")
            if kind == "json_schema":
                if not isinstance(fmt.get("schema"), dict):
                    raise param_error("text.format.schema", "a json_schema format needs a schema object")
                if not isinstance(fmt.get("name"), str) or not fmt["name"]:
                    raise param_error("text.format.name", "a json_schema format needs a name")
                if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
                    raise param_error("text.format.strict", "strict must be a boolean")
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise param_error("reasoning.effort", f"reasoning effort {effort!r} is not supported")
        return self


# -- input items -> chat messages ----------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _text_of(content: Any, where: str) -> str:
    """An item's content (a string or text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise param_error(where, "content must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise param_error(f"{where}.{j}.type", f"content part of type {kind!r} is not supported (text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_input(value: str | list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """The input as OpenAI lists it (`GET /v1/responses/{id}/input_items`): items with
    ids, messages with their content as parts. Raises a 400 naming an item it cannot
    take (images, files, built-in tool calls, item references)."""
    items = [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    out: list[dict[str, Any]] = []
    ids: set[str] = set()
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise param_error(where, "an input item must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        # The client's id, unless an earlier item has it (ids page input_items).
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] not in ids else None
        if item_id is not None:
            ids.add(item_id)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise param_error(f"{where}.role", f"message role {role!r} is not supported")
            text = _text_of(item.get("content"), f"{where}.content")
            part = "output_text" if role == "assistant" else "input_text"
            content: dict[str, Any] = {"type": part, "text": text}
            if part == "output_text":
                content["annotations"] = []
            out.append(
                {
                    "id": item_id or f"msg_{base}_in{i}",
                    "type": "message",
                    "role": role,
                    "content": [content],
                    "status": "completed",
                }
            )
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise param_error(f"{where}.{name}", f"a function_call item needs {name} (a string)")
            out.append(
                {
                    "id": item_id or f"fc_{base}_in{i}",
                    "type": "function_call",
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise param_error(f"{where}.call_id", "a function_call_output item needs call_id (a string)")
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            out.append(
                {
                    "id": item_id or f"fco_{base}_in{i}",
                    "type": "function_call_output",
                    "call_id": item["call_id"],
                    "output": text,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            for name in ("content", "summary"):
                if item.get(name) is not None and not isinstance(item[name], list):
                    raise param_error(f"{where}.{name}", f"a reasoning item's {name} must be a list of parts")
            texts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
            texts = texts or [p.get("text", "") for p in item.get("summary") or [] if isinstance(p, dict)]
            out.append(
                {
                    "id": item_id or f"rs_{base}_in{i}",
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "".join(t for t in texts if isinstance(t, str))}],
                }
            )
        else:
            raise param_error(f"{where}.type", f"input item type {kind!r} is not supported by this service")
    return out


def items_to_messages(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input or output items as chat messages: function calls join the assistant message
    before them (or make one), a reasoning item's text becomes the next assistant
    message's reasoning, a function call's output a tool message."""
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            reasoning = "".join(p.get("text", "") for p in item.get("content") or []) or None
        elif kind == "message":
            text = "".join(p.get("text", "") for p in item["content"])
            msg: dict[str, Any] = {"role": item["role"], "content": text}
            if item["role"] == "assistant" and reasoning is not None:
                msg["reasoning"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning"], reasoning = reasoning, None
                messages.append(msg)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("content") is None and not msg.get("tool_calls"):
            msg["content"] = ""
    return messages


class ResponseMeta(BaseModel):
    """What a response keeps beside its chat job (`JobRecord.response`): the request's
    own fields as the response object shows them, its input items, and the conversation
    before it (chat messages, from `previous_response_id`)."""

    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    user: str | None = None
    input: list[dict[str, Any]] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the prompt: instructions (not carried to the next turn),
        the conversation before, this input."""
        head = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return head + self.history + items_to_messages(self.input)

    def next_history(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation a response continuing this one starts from."""
        return self.history + items_to_messages(self.input) + items_to_messages(output)


def meta_of(req: ResponsesRequest, base: str, history: list[dict[str, Any]]) -> ResponseMeta:
    text = dict(req.text or {})
    text.setdefault("format", {"type": "text"})
    return ResponseMeta(
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=[
            {
                "type": "function",
                "name": t["name"],
                "description": t.get("description"),
                "parameters": t.get("parameters"),
                "strict": t.get("strict", True),
            }
            for t in req.tools or []
        ],
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        parallel_tool_calls=req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        text=text,
        reasoning={"effort": None, "summary": None, **(req.reasoning or {})},
        metadata=req.metadata or {},
        store=req.store,
        background=req.background,
        previous_response_id=req.previous_response_id,
        user=req.user,
        input=normalize_input(req.input, base),
        history=history,
    )


# Chat parameters as Responses names them (a chat-side 400 names the Responses field).
CHAT_PARAM_NAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}


def chat_body(req: ResponsesRequest, meta: ResponseMeta) -> dict[str, Any]:
    """The chat completion request that answers a response (validated as chat's)."""
    body: dict[str, Any] = {"model": req.model, "messages": meta.messages()}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", *PASSED_THROUGH):
        value = getattr(req, name)
        if value is not None and (name not in ("ignore_eos", "min_tokens") or value):
            body[name] = value
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {k: v for k, v in t.items() if k in ("name", "description", "parameters") and v is not None}
                # Strict unless the client says otherwise (OpenAI's default for Responses, as
                # the response object shows): vLLM then holds the arguments to the schema.
                | ({"strict": t.get("strict", True)} if t.get("strict", True) is not None else {}),
            }
            for t in req.tools
        ]
        choice = req.tool_choice if req.tool_choice is not None else "auto"
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice
        )
    elif req.tool_choice == "none":
        body["tool_choice"] = "none"
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:
        body["reasoning_effort"] = effort
    return body


# -- job events -> Responses events and objects --------------------------------------


def usage_object(usage: Any) -> dict[str, Any] | None:
    """A job's usage (prompt/completion tokens) in the Responses shape."""
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def response_object(
    response_id: str,
    model: str,
    created: float,
    meta: ResponseMeta,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete: str | None = None,
    completed_at: float | None = None,
) -> dict[str, Any]:
    """A `response` object, as OpenAI's (fields it has and llmq has no use for are null)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created),
        "status": status,
        "background": meta.background,
        "completed_at": int(completed_at) if completed_at is not None and status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": meta.instructions,
        "max_output_tokens": meta.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": meta.parallel_tool_calls,
        "previous_response_id": meta.previous_response_id,
        "reasoning": meta.reasoning,
        "service_tier": "default",
        "store": meta.store,
        "temperature": meta.temperature,
        "text": meta.text,
        "tool_choice": meta.tool_choice,
        "tools": meta.tools,
        "top_logprobs": 0,
        "top_p": meta.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": meta.user,
        "metadata": meta.metadata,
    }


# The codes of OpenAI's `response.error` (its SDK takes no other).
ERROR_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt")


def response_error(error: dict[str, Any] | None) -> dict[str, Any]:
    """A job's error (`{code, message, type, ...}`, possibly under "error") as a
    response's: OpenAI's code (`invalid_prompt` for a request the engine refused,
    `server_error` for the rest), llmq's own (worker_lost, queue_timeout, ...) leading
    the message."""
    body = error or {}
    if isinstance(body.get("error"), dict):
        body = body["error"]
    own = body.get("code")
    message = str(body.get("message") or "the response failed")
    if own in ERROR_CODES:
        return {"code": own, "message": message}
    code = "invalid_prompt" if body.get("type") == "invalid_request_error" else "server_error"
    return {"code": code, "message": f"{own}: {message}" if own else message}


# A job's finish reason -> the response's status (and its incomplete_details reason).
FINAL_STATUS = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "cancelled": ("cancelled", None),
    "error": ("failed", None),
}
# The stream's last event for each final status (OpenAI has no event for a cancelled
# response; llmq sends `response.cancelled`, shaped like the others, so a stream that
# was following a response cancelled elsewhere still ends with its final state).
FINAL_EVENT = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
}
WORKER_LOST_MESSAGE = (
    "the worker running this response was lost and it started over; its stream cannot continue without "
    "repeating or mixing output (tool calls, structured output or reasoning). Fetch it again: "
    "GET /v1/responses/{id}"
)


class ResponseTranslator:
    """Turns a response's job events (its replay log, then live events) into Responses
    events, numbered from 0. Deterministic: the same log gives the same events, ids and
    numbers, whoever reads it and whenever (what one reader is sent of them is
    `ResponseReader`'s business). `continuable`: a lost worker's next attempt continues
    the answer (a plain text job); if not, the output of the attempt it superseded is
    dropped when the next one's begins (the numbers go on), so the response shows only
    the last attempt's output."""

    def __init__(
        self,
        response_id: str,
        model: str,
        created: float,
        meta: ResponseMeta,
        continuable: bool = True,
    ):
        self.id = response_id
        self.model = model
        self.created = created
        self.meta = meta
        self.base = response_id.removeprefix(RESPONSE_PREFIX)
        self.continuable = continuable
        self.seq = -1
        self.output: list[dict[str, Any]] = []
        # The open item: its output index and kind ("message", "reasoning", "function_call").
        self._open: tuple[int, str] | None = None
        # Tool call index (in the chat deltas) -> output index of its function_call item.
        self._calls: dict[int, int] = {}
        # The attempt whose output `output` holds (None: no output yet).
        self.output_attempt: int | None = None
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.status = "queued" if meta.background else "in_progress"
        self.error: dict[str, Any] | None = None
        self.incomplete: str | None = None
        self.ended = False

    # -- the response object -----------------------------------------------------------

    def snapshot(self, completed_at: float | None = None) -> dict[str, Any]:
        return response_object(
            self.id,
            self.model,
            self.created,
            self.meta,
            self.status,
            [dict(item) for item in self.output],
            self.usage,
            self.error,
            self.incomplete,
            completed_at,
        )

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    # -- the stream ------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        """`response.created` (queued, for a background response) and `response.in_progress`."""
        created = self._event("response.created", response=self.snapshot())
        self.status = "in_progress"
        return [created, self._event("response.in_progress", response=self.snapshot())]

    def feed(
        self, kind: str, attempt: int, choices: list[Any], usage: Any = None, error: Any = None
    ) -> list[dict[str, Any]]:
        """One job event (`delta`, `done` or `error`) as Responses events."""
        if self.ended:
            return []
        if not self.continuable and self.output_attempt is not None and attempt != self.output_attempt:
            # The job started over: the superseded attempt's output is dropped, unfinished.
            self.output, self._open, self._calls, self.output_attempt = [], None, {}, None
        if kind == "delta":
            return self._delta(attempt, choices)
        for c in choices:
            if c.index == 0 and c.finish_reason:
                self.finish = c.finish_reason
        truncated = kind != "error" and FINAL_STATUS.get(self.finish or "stop", ("completed", None))[1] is not None
        events = self._close("incomplete" if truncated else "completed")
        if kind == "error":
            self.status, self.incomplete = "failed", None
            self.error = response_error(error)
        else:
            self.status, self.incomplete = FINAL_STATUS.get(self.finish or "stop", ("completed", None))
            if self.status == "failed":
                self.error = {"code": "server_error", "message": "the response failed"}
        self.usage = usage_object(usage)
        self.ended = True
        events.append(self._event(FINAL_EVENT[self.status], response=self.snapshot()))
        return events

    def _delta(self, attempt: int, choices: list[Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for c in choices:
            if c.index != 0:
                continue
            if c.reasoning:
                events += self._text("reasoning", c.reasoning)
            if c.text:
                events += self._text("message", c.text)
            for call in c.tool_calls or []:
                events += self._tool_call(call)
            if c.finish_reason:
                self.finish = c.finish_reason
        if events:
            self.output_attempt = attempt
        return events

    def _text(self, kind: str, delta: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open[1] != kind:
            events += self._close()
            index = len(self.output)
            item: dict[str, Any]
            part: dict[str, Any]
            if kind == "message":
                item = {
                    "id": f"msg_{self.base}_{index}",
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {
                    "id": f"rs_{self.base}_{index}",
                    "type": "reasoning",
                    "summary": [],
                    "content": [],
                    "status": "in_progress",
                }
                part = {"type": "reasoning_text", "text": ""}
            self.output.append(item)
            self._open = (index, kind)
            events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
            item["content"].append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        index = self._open[0]
        item = self.output[index]
        item["content"][0]["text"] += delta
        if kind == "message":
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=delta,
                    logprobs=[],
                )
            )
        else:
            events.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=delta,
                )
            )
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        fn = call.get("function") or {}
        k = int(call.get("index", 0))
        index = self._calls.get(k)
        if index is None or self._open is None or self._open[0] != index:
            events += self._close()
            index = len(self.output)
            item = {
                "id": f"fc_{self.base}_{index}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.get("id") or f"call_{self.base}_{k}",
                "name": fn.get("name") or "",
                "arguments": "",
            }
            self.output.append(item)
            self._calls[k] = index
            self._open = (index, "function_call")
            events.append(self._event("response.output_item.added", output_index=index, item=dict(item)))
        item = self.output[index]
        arguments = fn.get("arguments")
        if arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=arguments,
                )
            )
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        """The `.done` events of the open item (`status`: "incomplete" for the last item
        of an answer cut short by max_output_tokens, as OpenAI marks it)."""
        if self._open is None:
            return []
        index, kind = self._open
        self._open = None
        item = self.output[index]
        item["status"] = status
        events: list[dict[str, Any]] = []
        if kind == "function_call":
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            part = item["content"][0]
            done = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
            extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
            events.append(
                self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra)
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


# Events that carry no attempt's output (every reader gets them).
_LIFECYCLE = ("response.created", "response.in_progress")


class ResponseReader:
    """What one reader, whose cursor is `after` (-1: it has nothing), is sent of a
    response's events (a `ResponseTranslator`'s, fed the whole log from the start).

    A plain response (continuable) is its events after the cursor. One that starts over
    when its worker is lost: the reader "has" the attempt of the last output event at or
    before its cursor. Events of an attempt before `attempt` (the record's when the
    reader began) that it does not have are skipped (superseded: it will get the last
    attempt's output whole); events of another attempt than the one it has end its
    stream with an `error` event (`worker_lost`): it cannot continue without mixing
    two attempts' output, and reads again from the start or GETs the response."""

    def __init__(self, translator: ResponseTranslator, after: int = -1, attempt: int = 0):
        self.translator = translator
        self.after = after
        self.attempt = attempt
        self.has: int | None = None
        self.ended = False

    def start(self) -> list[dict[str, Any]]:
        return [e for e in self.translator.start() if e["sequence_number"] > self.after]

    def feed(
        self, kind: str, attempt: int, choices: list[Any], usage: Any = None, error: Any = None
    ) -> list[dict[str, Any]]:
        if self.ended:
            return []
        out: list[dict[str, Any]] = []
        for event in self.translator.feed(kind, attempt, choices, usage, error):
            seq = event["sequence_number"]
            if self.translator.continuable or event["type"] in _LIFECYCLE:
                if seq > self.after:
                    out.append(event)
                continue
            if seq <= self.after:
                self.has = attempt  # the reader has this one
                continue
            if self.has is not None and attempt != self.has:
                self.ended = True
                out.append(
                    {
                        "type": "error",
                        "sequence_number": seq,
                        "code": "worker_lost",
                        "message": WORKER_LOST_MESSAGE.format(id=self.translator.id),
                        "param": None,
                    }
                )
                return out
            if self.has is None and attempt < self.attempt:
                continue  # a superseded attempt's output, of which the reader has nothing
            self.has = attempt
            out.append(event)
        if self.translator.ended:
            self.ended = True
        return out
