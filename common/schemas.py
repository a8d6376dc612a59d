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
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
# Stop sequences a request may give: OpenAI's limit, and vLLM's (its protocol classes,
# which validate a rich job, refused more than 4 while plain ones took 16: a request the
# schema allowed was refused, found by the OpenAPI fuzz test).
MAX_STOP = 4

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


_TOOL_CALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]},
            },
        },
    },
}


def _message_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    props["tool_calls"] = {"anyOf": [{"type": "array", "items": _TOOL_CALL_SCHEMA}, {"type": "null"}]}
    # Content is required, except in an assistant message carrying tool calls.
    schema["anyOf"] = [
        {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
        {
            "required": ["role", "tool_calls"],
            "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}},
        },
    ]


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """A property's schema that also admits `null` (OpenAI's "not given")."""
    if prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", []):
        return prop
    if "enum" in prop:
        return prop if None in prop["enum"] else {**prop, "enum": [*prop["enum"], None]}
    meta: dict[str, Any] = {k: prop[k] for k in ("title", "description", "default") if k in prop}
    body = {k: v for k, v in prop.items() if k not in meta}
    if list(body) == ["anyOf"]:
        return {**meta, "anyOf": [*body["anyOf"], {"type": "null"}]}
    return {**meta, "anyOf": [body, {"type": "null"}]}


def _common_request_schema(schema: dict[str, Any], refused: dict[str, tuple[Any, ...]]) -> None:
    props = schema["properties"]
    props["stop"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
        ],
        "title": "Stop",
        "description": f"Up to {MAX_STOP} non-empty stop sequences (as OpenAI and vLLM).",
    }
    props["logit_bias"] = {
        "type": "object",
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "maxProperties": 1024,
        "title": "Logit Bias",
        "description": "Token id (a string) to a bias from -100 to 100; ids must be in the model's vocabulary.",
    }
    for name, allowed in refused.items():
        props[name] = {"enum": list(allowed), "title": name, "description": "Not supported (only its default)."}
    for name in list(props):
        if name not in schema.get("required", []):
            props[name] = _nullable(props[name])
    schema.setdefault("allOf", []).extend(
        [
            # stream_options only with stream: true.
            {
                "anyOf": [
                    {"required": ["stream"], "properties": {"stream": {"const": True}}},
                    {"properties": {"stream_options": {"type": "null"}}},
                ]
            },
            # n > 1 only when sampling (vLLM: "n must be 1 when using greedy sampling").
            {
                "anyOf": [
                    {"properties": {"n": {"enum": [1, None]}}},
                    {"properties": {"temperature": {"anyOf": [{"type": "null"}, {"minimum": GREEDY_EPS}]}}},
                ]
            },
        ]
    )


def _chat_request_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    tools = next(b for b in props["tools"]["anyOf"] if b.get("type") == "array")
    tools["minItems"] = 1
    props["tool_choice"]["description"] = (
        "`auto` (the default with tools) needs ENABLE_AUTO_TOOL_CHOICE and TOOL_CALL_PARSER on the "
        "model's workers; `required` and a named function need TOOL_CALL_PARSER; a named function must be "
        "in `tools`."
    )
    props["top_logprobs"] = {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "title": "Top Logprobs"}
    _common_request_schema(schema, REFUSED_CHAT)
    schema["allOf"] += [
        # tool_choice other than none (or null) needs tools.
        {
            "anyOf": [
                {"required": ["tools"], "properties": {"tools": {"type": "array"}}},
                {"properties": {"tool_choice": {"enum": ["none", None]}}},
            ]
        },
        # top_logprobs above 0 needs logprobs: true.
        {
            "anyOf": [
                {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                {"properties": {"top_logprobs": {"enum": [0, None]}}},
            ]
        },
    ]


def _completion_request_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    props["prompt"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}, "minItems": 1},
            {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
                    "minItems": 1,
                },
                "minItems": 1,
            },
        ],
        "title": "Prompt",
        "description": "A string, a list of strings, token ids, or a list of token-id lists (one job, "
        "`n` choices per prompt). Token ids must be in the model's vocabulary.",
    }
    props["logprobs"] = {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "title": "Logprobs"}
    _common_request_schema(schema, REFUSED_COMPLETION)
    # best_of only equal to n (n's default is 1).
    schema["allOf"].append(
        {
            "anyOf": [
                {"properties": {"best_of": {"type": "null"}}},
                {"properties": {"best_of": {"const": 1}, "n": {"enum": [1, None]}}},
                *(
                    {"required": ["n"], "properties": {"best_of": {"const": k}, "n": {"const": k}}}
                    for k in range(2, MAX_BEST_OF + 1)
                ),
            ]
        }
    )


def param_error(param: str, message: str) -> PydanticCustomError:
    """A validation error naming the parameter at fault (`api.errors` puts it in `param`)."""
    return PydanticCustomError("invalid_param", message, {"param": param})


# OpenAI's and vLLM's fields that change the answer and that this service does not
# support: refused with a 400 naming them unless absent, null, or one of these values.
REFUSED_COMMON: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "prompt_logprobs": (),
    "return_token_ids": (False,),
    "return_tokens_as_token_ids": (False,),
    "truncate_prompt_tokens": (),
    "logprob_token_ids": (),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "thinking_token_budget": (),
    "vllm_xargs": (),
    "repetition_detection": (),
    "kv_transfer_params": (),
    "prompt_embeds": (),
    "watermarking": (False,),
}
REFUSED_CHAT: dict[str, tuple[Any, ...]] = {
    # Legacy function calling: use `tools` / `tool_choice`.
    "functions": (),
    "function_call": (),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "echo": (False,),
    "chat_template": (),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "documents": (),
    "mm_processor_kwargs": (),
    "media_io_kwargs": (),
    "return_prompt_text": (False,),
    **REFUSED_COMMON,
}
REFUSED_COMPLETION: dict[str, tuple[Any, ...]] = {"suffix": (), **REFUSED_COMMON}
MAX_LOGPROBS = 20
# best_of is accepted equal to n up to this (each value is a branch of the documented schema).
MAX_BEST_OF = 8
# Below this temperature vLLM samples greedily, and then takes only n = 1.
GREEDY_EPS = 1e-5


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality (`0` is not `false`)."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    return type(value) is type(allowed) and value == allowed


def drop_nulls_and_refuse(
    data: Any, refused: dict[str, tuple[Any, ...]], keep_null: frozenset[str] = frozenset()
) -> Any:
    """OpenAI's `null` is "not given": such fields are dropped (so the defaults apply, and
    the worker's vLLM request sees them unset), except those where vLLM reads null
    differently from absent (`keep_null`). A refused field with another value is a 400
    naming it."""
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if v is not None or k in keep_null}
    for name, allowed in refused.items():
        if name in out and not any(_same(out[name], a) for a in allowed):
            raise param_error(name, f"{name} is not supported by this service")
    return out


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
    # An assistant turn's reasoning (vLLM reads both names), given to the chat template.
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise param_error("content", f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise param_error("content", f"content part of type {part.type!r} is not supported")
        for i, call in enumerate(self.tool_calls or []):
            fn = call.get("function")
            if call.get("type", "function") != "function" or not isinstance(fn, dict):
                raise param_error(f"tool_calls.{i}", "chat completions only support tool_calls of type 'function'")
            if "id" in call and not isinstance(call["id"], str):
                raise param_error(f"tool_calls.{i}.id", "a tool call's id must be a string")
            if not isinstance(fn.get("name"), str):
                raise param_error(f"tool_calls.{i}.function.name", "a tool call needs a function name")
            if not isinstance(fn.get("arguments"), str | dict | None):
                raise param_error(f"tool_calls.{i}.function.arguments", "arguments must be a JSON string")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM joins them)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def text_parts(self) -> list[str]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [self.content]
        return [part.text or "" for part in self.content]

    def text_chars(self) -> int:
        """Characters of what the chat template renders from this message."""
        chars = len(self.text()) + len(self.name or "") + len(self.tool_call_id or "")
        chars += len(self.reasoning or self.reasoning_content or "")
        return chars + (len(json.dumps(self.tool_calls, ensure_ascii=False, default=str)) if self.tool_calls else 0)

    def for_template(self, content_format: str = "string") -> dict[str, Any]:
        """The message as vLLM hands it to a chat template (vllm/renderers/chat_utils.py,
        `_parse_chat_message_content` and `_postprocess_messages`): content a string (text
        parts joined by newlines) or, for templates that loop over content parts, a list of
        text parts; an assistant's tool calls with their `arguments` as dicts; its
        reasoning under both names; a tool message's `tool_call_id`; `name` if given."""
        out: dict[str, Any] = {"role": self.role}
        if content_format == "openai" and self.role != "tool":
            out["content"] = [{"type": "text", "text": t} for t in self.text_parts()]
        else:
            out["content"] = self.text()
        if self.role == "assistant":
            if self.tool_calls is not None:
                out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
                if not out["tool_calls"]:
                    del out["tool_calls"]
            reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
            if reasoning is not None:
                out["reasoning"] = reasoning
                out["reasoning_content"] = reasoning
        elif self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.role == "developer":
            out["tools"] = None
        return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """A history tool call as HF chat templates expect it: `arguments` a dict (a JSON
    string parsed; invalid, empty or not an object: `{}`), as vLLM does."""
    out = dict(call)
    fn = dict(out.get("function") or {})
    args = fn.get("arguments")
    if not args:
        parsed: Any = {}
    elif isinstance(args, dict):
        parsed = args
    else:
        try:
            parsed = json.loads(args)
        except (TypeError, ValueError):
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
    fn["arguments"] = parsed
    out["function"] = fn
    return out


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        default=False, json_schema_extra={"enum": [False, None]}, description="Not supported."
    )

    @model_validator(mode="after")
    def _supported(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise param_error("continuous_usage_stats", "continuous_usage_stats is not supported")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def for_template(self) -> dict[str, Any]:
        # As vLLM's FunctionDefinition serializes: name, description, parameters (null
        # if not given), strict only when set; no other field.
        out: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if self.strict is not None:
            out["strict"] = self.strict
        return out


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.for_template()}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str
    description: str | None = None
    # Required, as vLLM requires it (without one its request fails "none are specified").
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


def _response_format_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    ref = next(b for b in props["json_schema"]["anyOf"] if "$ref" in b)
    props["type"] = {"enum": ["text", "json_object", "json_schema"], "type": "string", "title": "Type"}
    schema["anyOf"] = [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["json_schema"], "properties": {"type": {"const": "json_schema"}, "json_schema": ref}},
    ]


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_response_format_schema)
    type: str
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _known(self) -> ResponseFormat:
        if self.type not in ("text", "json_object", "json_schema"):
            raise param_error("type", f"response_format type {self.type!r} is not supported")
        if self.type == "json_schema" and self.json_schema is None:
            raise param_error("json_schema", "When response_format type is 'json_schema', 'json_schema' is required")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint (json, regex, choice, grammar,
    json_object), and its options."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda s: _one_constraint_schema(s))
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
            count = sum(k in data for k in CONSTRAINTS)
            if count != 1:
                raise param_error(
                    "",
                    "structured_outputs needs exactly one constraint (json, regex, choice, grammar or json_object)",
                )
        return data


CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _one_constraint_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    for name in list(props):
        props[name] = _nullable(props[name])
    schema["oneOf"] = [{"required": [c], "properties": {c: {"not": {"type": "null"}}}} for c in CONSTRAINTS]
    for branch in schema["oneOf"]:
        others = [c for c in CONSTRAINTS if c not in branch["required"]]
        branch["properties"].update({o: {"type": "null"} for o in others})


def _valid_unicode(data: Any) -> Any:
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


def _stop_list(value: object) -> object:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        return stops  # let the type check say what is wrong
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise param_error("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        if not -100 <= value <= 100:
            raise param_error("logit_bias", f"logit_bias values must be from -100 to 100, got {value}")
    if bias is not None and len(bias) > 1024:
        raise param_error("logit_bias", "logit_bias may hold at most 1024 tokens")


# Fields of a request that llmq reads itself and never hands to the worker's vLLM request.
_OWN_FIELDS = {"messages", "prompt", "background", "max_completion_tokens"}


class _SamplingFields(BaseModel):
    """What chat and completions share: OpenAI's sampling parameters and vLLM's."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str = Field(min_length=1)
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
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Answer at once with the queued job; fetch it later (GET .../{id}).
    background: bool = False
    response_format: ResponseFormat | None = None
    # vLLM extensions.
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    structured_outputs: StructuredOutputs | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    add_special_tokens: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: object) -> object:
        return _stop_list(value)

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 <= t <= INT32_MAX for t in value):
            raise ValueError("token ids must be from 0 up")
        return value

    def _common_checks(self) -> None:
        if self.n > 1 and self.temperature is not None and self.temperature < GREEDY_EPS:
            raise param_error("n", f"n must be 1 when using greedy sampling, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise param_error("stream_options", "stream_options is only allowed when stream is true")
        _check_logit_bias(self.logit_bias)
        rf = getattr(self, "response_format", None)
        if self.structured_outputs is not None and rf is not None and rf.type != "text":
            # vLLM refuses two constraints ("only one kind of structured outputs"), on the
            # worker, after a stream's 200: refused here, before anything is queued.
            raise param_error(
                "structured_outputs", f"structured_outputs cannot be combined with response_format {rf.type!r}"
            )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_extras(self) -> bool:
        """Whether it asks for vLLM sampling options the plain (lean) job path lacks."""
        rf = self.response_format
        return bool(
            self.logit_bias
            or (rf is not None and rf.type != "text")
            or self.structured_outputs is not None
            or self.stop_token_ids
            or self.include_stop_str_in_output
            or not self.skip_special_tokens
            or not self.spaces_between_special_tokens
        )

    def vllm_body(self, max_tokens: int) -> dict[str, Any]:
        """The request as the worker hands it to vLLM's own protocol model: the fields the
        client set (unset ones take vLLM's defaults), OpenAI's names, without llmq's own
        and the prompt; `max_tokens` the resolved per-choice budget."""
        known = set(type(self).model_fields) - _OWN_FIELDS
        body = self.model_dump(include=known, exclude_unset=True, by_alias=True, mode="json")
        body["max_tokens"] = max_tokens
        return body


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`. OpenAI's `null` for any optional field means "not
    given". Unknown fields are ignored (user, metadata, store, service_tier, ...); fields
    that would change the answer and are not supported are refused, naming them.
    `min_tokens` must not exceed the (resolved) `max_tokens`, and the prompt plus
    `max_tokens` must fit the model's context."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, json_schema_extra=_chat_request_schema)

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    # vLLM extensions.
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        # tool_choice: null is kept: vLLM reads it as "no forced choice", not as the "auto"
        # an absent tool_choice becomes when tools are given.
        return drop_nulls_and_refuse(_valid_unicode(data), REFUSED_CHAT, frozenset({"tool_choice"}))

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        self._common_checks()
        if self.top_logprobs and not self.logprobs:
            raise param_error("top_logprobs", "when using top_logprobs, logprobs must be set to true")
        if self.tools is not None and not self.tools:
            raise param_error("tools", "tools must not be an empty array; give at least one tool or omit it")
        choice = self.tool_choice
        if "tool_choice" not in self.model_fields_set and self.tools:
            self.tool_choice = choice = "auto"  # OpenAI's (and vLLM's) default with tools
        if choice is not None and choice != "none":
            if not self.tools:
                raise param_error("tool_choice", "When using tool_choice, tools must be set")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools
            }:
                raise param_error("tool_choice", "The tool specified in tool_choice does not match any of the tools")
        so = self.structured_outputs
        if so is not None and isinstance(choice, NamedToolChoice) and (so.json_ or so.regex or so.choice):
            raise param_error("structured_outputs", "use either structured outputs or a named tool_choice, not both")
        for bad in ("chat_template", "tokenize"):
            if bad in (self.chat_template_kwargs or {}):
                raise param_error("chat_template_kwargs", f"chat_template_kwargs may not set {bad!r}")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tools_active(self) -> bool:
        """Tool calls may be parsed from the answer (tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def needs_output(self, reasoning_parser: str | None) -> bool:
        """Whether the job needs the worker's rich path (OutputSpec)."""
        return bool(reasoning_parser) or self.tools_active or self.logprobs or self.sampling_extras()

    def vllm_body(self, max_tokens: int) -> dict[str, Any]:
        body = super().vllm_body(max_tokens)
        if self.tools and "tool_choice" not in body:
            body["tool_choice"] = "auto"
        return body


CompletionPrompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions` (legacy completions, as vLLM serves them). `prompt` is a
    string, a list of strings, token ids or a list of token-id lists: one job, `n`
    choices per prompt (choice `p * n + j`). `max_tokens` defaults to 16 (null: the room
    left in the context). `suffix` is refused, `best_of` unless it equals `n`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, json_schema_extra=_completion_request_schema)

    prompt: CompletionPrompt
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=INT32_MAX)
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        # max_tokens: null is the room left in the context; absent, 16.
        return drop_nulls_and_refuse(_valid_unicode(data), REFUSED_COMPLETION, frozenset({"max_tokens"}))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: CompletionPrompt) -> CompletionPrompt:
        if value == "" or (isinstance(value, list) and not value):
            raise ValueError("prompt must not be empty")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, list | str) and not item:
                    raise ValueError("a prompt must not be empty")
                if isinstance(item, int) and not 0 <= item <= INT32_MAX:
                    raise ValueError("token ids must be from 0 up")
                if isinstance(item, list) and any(not 0 <= t <= INT32_MAX for t in item):
                    raise ValueError("token ids must be from 0 up")
        return value

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        self._common_checks()
        if self.best_of is not None and (self.best_of != self.n or self.n > MAX_BEST_OF):
            raise param_error("best_of", f"best_of is supported only equal to n (up to {MAX_BEST_OF})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def needs_output(self) -> bool:
        return self.logprobs is not None or self.echo or self.sampling_extras()

    def vllm_body(self, max_tokens: int) -> dict[str, Any]:
        body = super().vllm_body(max_tokens)
        body.pop("best_of", None)  # vLLM has none; it equals n
        return body


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any] = Field(description="`name` and `arguments` (a JSON string).")


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # Tool calls the model made (finish_reason `tool_calls`); absent when none.
    tool_calls: list[ToolCall] | None = None
    # The model's thinking, with a reasoning parser on the worker (vLLM's names).
    reasoning: str | None = None
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = Field(default=None, description='`{"content": [...]}` with `logprobs`.')
    # vLLM's extension on a finished choice: the stop string (or token id) that ended it.
    stop_reason: str | int | None = None


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
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Tool-call deltas as OpenAI streams them (`index`, `id`, `type`, `function`)."
    )


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None
    # vLLM's extension on a finished choice: the stop string (or token id) that ended it.
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    # llmq: the job event's sequence number (resume after it: `?starting_after=<seq>`),
    # and the attempt, when a lost worker's job continued on another.
    seq: int | None = None
    attempt: int | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's extension on a finished choice: the stop string (or token id) that ended it.
    stop_reason: str | int | None = None
    # vLLM's extensions with `echo` (or `prompt_logprobs`): the prompt's logprobs (per
    # prompt token null or {token id: {logprob, rank, decoded_token}}; not streamed), and
    # its token ids (streamed with the echo).
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(Completion):
    seq: int | None = None
    attempt: int | None = None


class CompletionJob(BaseModel):
    """A completion job as `GET /v1/completions/{id}` shows it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    background: bool = False
    attempt: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmq"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
