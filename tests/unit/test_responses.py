"""The Responses API, pure parts (common/responses.py, api/endpoints/responses.py): the
events `ResponseTranslator` makes of a job's replay log and the response objects, checked
strictly against the official `openai` SDK's types (and vLLM's own event shapes); their
order, determinism and resumption; superseded attempts; the batch path's objects
(`result_object`); input items as chat messages and the chat request (`chat_body`); and
the requests refused, naming the field. No services."""

from __future__ import annotations

import copy
import json
from typing import Any

import pydantic
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from api.endpoints.responses import output_from_result, result_object
from api.errors import install_error_handlers
from common.jobs import ChoiceDelta, ChoiceResult, ChunkEvent, JobRecord, JobResult, JobStatus
from common.responses import (
    ResponseMeta,
    ResponseReader,
    ResponsesRequest,
    ResponseTranslator,
    chat_body,
    items_to_messages,
    meta_of,
    normalize_input,
)
from common.schemas import ChatCompletionRequest, Usage

RID = "resp_0123abcd"
BASE = "0123abcd"
MODEL = "m"
CREATED = 1_700_000_000.0
FINISHED = 1_700_000_007.0
USAGE = Usage(prompt_tokens=11, completion_tokens=5, total_tokens=16)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}

# -- strict validation against the SDK's types ----------------------------------------

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
EVENT_CLASS: dict[str, type[pydantic.BaseModel]] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.reasoning_text.delta": ResponseReasoningTextDeltaEvent,
    "response.reasoning_text.done": ResponseReasoningTextDoneEvent,
    "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent,
    "response.completed": ResponseCompletedEvent,
    "response.incomplete": ResponseIncompleteEvent,
    "response.failed": ResponseFailedEvent,
    "error": ResponseErrorEvent,
}
ITEM_CLASS: dict[str, type[pydantic.BaseModel]] = {
    "message": ResponseOutputMessage,
    "reasoning": ResponseReasoningItem,
    "function_call": ResponseFunctionToolCall,
}
# Fields OpenAI's API sends that this SDK version does not declare (so they land in
# `model_extra`): the function's name on `function_call_arguments.done` (vLLM sends it
# too: streaming_events.emit_simple_tool_call_done) and the response's `store`.
ALLOWED_EXTRAS = {("response.function_call_arguments.done", "name")}
ALLOWED_RESPONSE_EXTRAS = {"store"}


def extras(value: Any, path: str = "") -> list[str]:
    """Every field the SDK's models took as an undeclared extra, by path."""
    out: list[str] = []
    if isinstance(value, pydantic.BaseModel):
        out += [f"{path}.{k}" for k in value.model_extra or {}]
        for name in type(value).model_fields:
            out += extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out += extras(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            out += extras(v, f"{path}.{k}")
    return out


def check_response(obj: dict[str, Any]) -> Response:
    """A response object as the SDK's `Response`, strictly: every field declared, none
    coerced, output items of their own classes."""
    model = Response.model_validate(obj, strict=True)
    unexpected = [e for e in extras(model) if e.lstrip(".") not in ALLOWED_RESPONSE_EXTRAS]
    assert not unexpected, f"fields the SDK does not know: {unexpected}"
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == obj
    for item, raw in zip(model.output, obj["output"], strict=True):
        assert type(item) is ITEM_CLASS[raw["type"]], (type(item), raw)
    return model


def check_event(event: dict[str, Any]) -> pydantic.BaseModel:
    """One event as the SDK's `ResponseStreamEvent`, strictly: the expected class (not
    another member of the union), no undeclared fields, nothing coerced."""
    kind = event["type"]
    EVENT_CLASS[kind].model_validate(event, strict=True)  # its own class first: a readable error
    model = STREAM_EVENT.validate_python(event, strict=True)
    assert type(model) is EVENT_CLASS[kind], (type(model), kind)
    unexpected = [
        e
        for e in extras(model)
        if (kind, e.lstrip(".")) not in ALLOWED_EXTRAS
        and not (e.startswith(".response.") and e.removeprefix(".response.") in ALLOWED_RESPONSE_EXTRAS)
    ]
    assert not unexpected, f"{kind}: fields the SDK does not know: {unexpected}"
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == event
    if "response" in event:
        check_response(event["response"])
    if "item" in event:
        item = model.item  # type: ignore[attr-defined]
        assert type(item) is ITEM_CLASS[event["item"]["type"]], (type(item), event["item"])
    if event.get("part", {}).get("type") == "output_text":
        assert type(model.part) is ResponseOutputText  # type: ignore[attr-defined]
    return model


# -- job logs and their translation ----------------------------------------------------


def d(
    text: str = "",
    reasoning: str | None = None,
    calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    tokens: int | None = None,
) -> ChoiceDelta:
    """Choice 0's delta (a token per character of text, unless given)."""
    n = len(text) if tokens is None else tokens
    return ChoiceDelta(
        index=0, text=text, reasoning=reasoning, tool_calls=calls, finish_reason=finish, token_ids=list(range(n))
    )


def call(k: int, args: str, name: str | None = None, call_id: str | None = None) -> dict[str, Any]:
    """A tool-call delta as OpenAI streams it: the first fragment names the call."""
    out: dict[str, Any] = {"index": k, "function": {"arguments": args}}
    if name is not None:
        out.update(id=call_id or f"call_{k}", type="function")
        out["function"]["name"] = name
    return out


def log_of(*events: tuple[str, Any], attempt: int = 1) -> list[ChunkEvent]:
    """A replay log: ("delta", ChoiceDelta | [ChoiceDelta]), ("done", finish | None),
    ("error", body), each optionally with its attempt as a third element."""
    out = []
    for seq, spec in enumerate(events):
        kind, value, *rest = spec
        at = rest[0] if rest else attempt
        if kind == "delta":
            out.append(
                ChunkEvent(seq=seq, kind="delta", attempt=at, choices=value if isinstance(value, list) else [value])
            )
        elif kind == "done":
            choices = [ChoiceDelta(index=0, finish_reason=value)] if value else []
            out.append(ChunkEvent(seq=seq, kind="done", attempt=at, choices=choices, usage=USAGE))
        else:
            out.append(ChunkEvent(seq=seq, kind="error", attempt=at, error=value))
    return out


def meta(**kw: Any) -> ResponseMeta:
    return ResponseMeta(**kw)


def translator(m: ResponseMeta | None = None, continuable: bool = True) -> ResponseTranslator:
    return ResponseTranslator(RID, MODEL, CREATED, m or meta(), continuable=continuable)


def translate(
    log: list[ChunkEvent], m: ResponseMeta | None = None, continuable: bool = True, attempt: int = 0, after: int = -1
) -> list[dict[str, Any]]:
    """What a reader gets (as the API's stream): the start, then every event of the log,
    through a ResponseReader whose cursor is `after` and that read the record at
    `attempt`."""
    r = ResponseReader(translator(m, continuable), after, attempt)
    events = r.start()
    for ev in log:
        events += r.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
        if r.ended:
            break
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


ENGINE_ERROR = {
    "error": {"message": "generation failed: boom", "type": "server_error", "param": None, "code": "engine_error"}
}

PLAIN = log_of(("delta", d("Hel")), ("delta", d("lo", finish="stop")), ("done", None))
REASONING = log_of(
    ("delta", d(reasoning="Let me", tokens=2)),
    ("delta", d(reasoning=" think", tokens=1)),
    ("delta", d("Paris")),
    ("delta", d(".", finish="stop")),
    ("done", None),
)
TEXT_TOOL = log_of(
    ("delta", d("Sure.")),
    ("delta", d(calls=[call(0, "", name="get_weather", call_id="call_a")], tokens=3)),
    ("delta", d(calls=[call(0, '{"city": ')], tokens=3)),
    ("delta", d(calls=[call(0, '"Paris"}')], finish="tool_calls", tokens=3)),
    ("done", None),
)
TWO_TOOLS = log_of(
    ("delta", d(calls=[call(0, '{"city"', name="get_weather", call_id="call_a")], tokens=3)),
    ("delta", d(calls=[call(0, ': "Paris"}')], tokens=3)),
    ("delta", d(calls=[call(1, '{"city": ', name="get_weather", call_id="call_b")], tokens=3)),
    ("delta", d(calls=[call(1, '"Rome"}')], finish="tool_calls", tokens=3)),
    ("done", None),
)
LENGTH = log_of(("delta", d("one two")), ("delta", d(" three", finish="length")), ("done", None))
# Cancelled mid-answer: the worker's last delta, or the store's end event with no delta.
CANCELLED = log_of(("delta", d("Hel")), ("delta", d(finish="cancelled", tokens=0)), ("done", None))
CANCELLED_BY_STORE = log_of(("delta", d("Hel")), ("done", "cancelled"))
FAILED = log_of(("delta", d("Hel")), ("error", ENGINE_ERROR))
FAILED_SERVER_ERROR = log_of(
    ("delta", d("Hel")),
    ("error", {"error": {"message": "it broke", "type": "server_error", "param": None, "code": "server_error"}}),
)

TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
REASONING_DONE = ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
CALL_DONE = ["response.function_call_arguments.done", "response.output_item.done"]
START = ["response.created", "response.in_progress"]

SCENARIOS: dict[str, tuple[list[ChunkEvent], ResponseMeta]] = {
    "plain": (PLAIN, meta()),
    "reasoning": (REASONING, meta(reasoning={"effort": "low", "summary": None})),
    "text_tool": (TEXT_TOOL, meta(tools=[{**TOOL, "strict": True}])),
    "two_tools": (TWO_TOOLS, meta(tools=[{**TOOL, "strict": True}], tool_choice="required")),
    "length": (LENGTH, meta(max_output_tokens=3)),
    "cancelled": (CANCELLED, meta()),
    "cancelled_by_store": (CANCELLED_BY_STORE, meta()),
    "failed": (FAILED, meta()),
    "failed_server_error": (FAILED_SERVER_ERROR, meta()),
    "background": (PLAIN, meta(background=True)),
    "everything_set": (
        PLAIN,
        meta(
            instructions="Be brief.",
            max_output_tokens=20,
            temperature=0.0,
            top_p=0.5,
            tools=[{**TOOL, "strict": True}],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "place", "schema": {"type": "object"}, "strict": True}},
            reasoning={"effort": "high", "summary": None},
            metadata={"k": "v"},
            previous_response_id="resp_before",
            user="u1",
            input=normalize_input("hi", BASE),
        ),
    ),
}


# -- every event and object validates against the SDK ----------------------------------


# "failed" carries a job's own error code (engine_error): test_failed_response_error_code_is_one_the_sdk_knows.
STRICT = sorted(set(SCENARIOS) - {"failed"})


@pytest.mark.parametrize("name", STRICT)
def test_every_event_validates_strictly(name: str) -> None:
    log, m = SCENARIOS[name]
    events = translate(log, m)
    for event in events:
        if event["type"] == "response.cancelled":
            continue  # llmq's own: test_cancelled_is_shaped_like_completed
        check_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_response_objects_validate_strictly_at_every_step() -> None:
    """The snapshot a GET shows mid-answer (in progress, items still open) too."""
    for name in STRICT:
        log, m = SCENARIOS[name]
        t = translator(m)
        t.start()
        check_response(t.snapshot())
        for ev in log:
            t.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
            snap = t.snapshot(completed_at=FINISHED)
            if snap["status"] != "cancelled":
                check_response(snap)


def test_cancelled_is_shaped_like_completed() -> None:
    for log in (CANCELLED, CANCELLED_BY_STORE):
        events = translate(log)
        last = events[-1]
        assert last["type"] == "response.cancelled"
        assert set(last) == {"type", "sequence_number", "response"}
        assert last["response"]["status"] == "cancelled"
        # The same event as response.completed, but for its type.
        model = check_event({**last, "type": "response.completed"})
        assert model.response.status == "cancelled"  # type: ignore[attr-defined]
        assert model.response.output_text == "Hel"  # type: ignore[attr-defined]
        assert last["response"]["usage"]["input_tokens"] == USAGE.prompt_tokens


def test_failed_response_error_code_is_one_the_sdk_knows() -> None:
    """`Response.error.code` is a closed set in OpenAI's API (server_error,
    rate_limit_exceeded, invalid_prompt, ...): a job's own codes (engine_error,
    worker_lost) do not validate there."""
    last = translate(FAILED)[-1]
    assert last["type"] == "response.failed"
    assert "boom" in last["response"]["error"]["message"]
    check_event(last)


# -- event order ----------------------------------------------------------------------


def test_plain_text_order() -> None:
    events = translate(PLAIN)
    assert types(events) == [*START, *TEXT_EVENTS, "response.output_text.delta", *TEXT_DONE, "response.completed"]
    created, in_progress = events[0]["response"], events[1]["response"]
    assert created["status"] == "in_progress" and in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["Hel", "lo"]
    item_id = f"msg_{BASE}_0"
    assert {e.get("item_id", item_id) for e in events[2:-1]} == {item_id}
    assert all(e["output_index"] == 0 for e in events[2:-1])
    assert all(e["content_index"] == 0 for e in events[2:-1] if "content_index" in e)
    added, done = events[2]["item"], events[-2]["item"]
    assert added == {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    assert done["status"] == "completed" and done["content"][0]["text"] == "Hello"
    assert events[-4]["text"] == "Hello"  # output_text.done
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"] == [done]
    assert final["usage"] == {
        "input_tokens": 11,
        "input_tokens_details": final["usage"]["input_tokens_details"],
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 16,
    }
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 0
    assert Response.model_validate(final).output_text == "Hello"


def test_reasoning_then_text_order() -> None:
    events = translate(REASONING)
    reasoning = [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        *REASONING_DONE,
    ]
    text = [*TEXT_EVENTS, "response.output_text.delta", *TEXT_DONE]
    assert types(events) == [*START, *reasoning, *text, "response.completed"]
    rs, msg = events[-1]["response"]["output"]
    assert rs == {
        "id": f"rs_{BASE}_0",
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "Let me think"}],
        "status": "completed",
    }
    assert msg["id"] == f"msg_{BASE}_1" and msg["content"][0]["text"] == "Paris."
    assert [e["output_index"] for e in events[2:-1]] == [0] * len(reasoning) + [1] * len(text)
    assert events[2 + 4]["text"] == "Let me think"  # reasoning_text.done


def test_text_then_tool_call_order() -> None:
    events = translate(TEXT_TOOL)
    calls = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        *CALL_DONE,
    ]
    assert types(events) == [*START, *TEXT_EVENTS, *TEXT_DONE, *calls, "response.completed"]
    msg, fc = events[-1]["response"]["output"]
    assert msg["content"][0]["text"] == "Sure."
    assert fc == {
        "id": f"fc_{BASE}_1",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_a",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    added = events[2 + len(TEXT_EVENTS) + len(TEXT_DONE)]
    assert added["item"] == {**fc, "status": "in_progress", "arguments": ""}
    args_done = events[-3]
    assert args_done["arguments"] == '{"city": "Paris"}' and args_done["item_id"] == fc["id"]
    assert events[-1]["response"]["status"] == "completed"


def test_two_tool_calls_order() -> None:
    events = translate(TWO_TOOLS)
    one = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        *CALL_DONE,
    ]
    assert types(events) == [*START, *one, *one, "response.completed"]
    a, b = events[-1]["response"]["output"]
    assert (a["id"], a["call_id"], json.loads(a["arguments"])) == (f"fc_{BASE}_0", "call_a", {"city": "Paris"})
    assert (b["id"], b["call_id"], json.loads(b["arguments"])) == (f"fc_{BASE}_1", "call_b", {"city": "Rome"})
    deltas = [(e["output_index"], e["delta"]) for e in events if e["type"].endswith("arguments.delta")]
    assert deltas == [(0, '{"city"'), (0, ': "Paris"}'), (1, '{"city": '), (1, '"Rome"}')]


def test_length_is_incomplete_max_output_tokens() -> None:
    events = translate(LENGTH, meta(max_output_tokens=3))
    assert types(events) == [*START, *TEXT_EVENTS, "response.output_text.delta", *TEXT_DONE, "response.incomplete"]
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 3 and final["completed_at"] is None
    assert final["output"][0]["content"][0]["text"] == "one two three"
    assert Response.model_validate(final).incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


@pytest.mark.parametrize("log", [CANCELLED, CANCELLED_BY_STORE], ids=["worker", "store"])
def test_cancelled_order(log: list[ChunkEvent]) -> None:
    events = translate(log)
    assert types(events) == [*START, *TEXT_EVENTS, *TEXT_DONE, "response.cancelled"]
    final = events[-1]["response"]
    assert final["status"] == "cancelled" and final["error"] is None and final["incomplete_details"] is None
    assert final["output"][0]["content"][0]["text"] == "Hel"


def test_error_is_failed_with_code_and_message() -> None:
    events = translate(FAILED_SERVER_ERROR)
    assert types(events) == [*START, *TEXT_EVENTS, *TEXT_DONE, "response.failed"]
    final = events[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "it broke"}
    assert final["usage"] is None and final["incomplete_details"] is None
    # The engine's own error body (not wrapped in "error") is read the same.
    bare = translate(log_of(("error", {"message": "it broke", "code": "server_error"})))
    assert types(bare) == [*START, "response.failed"]
    assert bare[-1]["response"]["error"] == {"code": "server_error", "message": "it broke"}


def test_background_starts_queued() -> None:
    events = translate(PLAIN, meta(background=True))
    assert events[0]["type"] == "response.created"
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["background"] is True
    assert events[1]["type"] == "response.in_progress" and events[1]["response"]["status"] == "in_progress"
    assert events[-1]["response"]["status"] == "completed" and events[-1]["response"]["background"] is True
    # Not background: never queued.
    assert translate(PLAIN)[0]["response"]["status"] == "in_progress"


def test_nothing_after_the_end() -> None:
    t = translator()
    t.start()
    for ev in PLAIN:
        t.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
    assert t.ended
    assert t.feed("delta", 1, [d("more")]) == [] and t.feed("done", 1, [], USAGE) == []


def test_same_event_types_and_fields_as_vllm() -> None:
    """vLLM's own Responses stream (its simple path: reasoning, then content, then a tool
    call) has the same events, in the same order, with the same fields."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.responses import streaming_events as se

    st = se.SimpleStreamingState()
    theirs = []
    theirs += se.emit_simple_reasoning_open(st) + se.emit_simple_reasoning_delta(st, "think")
    theirs += se.emit_simple_reasoning_done(st)
    theirs += se.emit_simple_content_open(st) + se.emit_simple_content_delta(st, "Hi")
    theirs += se.emit_simple_content_done(st)
    theirs += se.emit_simple_tool_call_open(st, "get_weather", 0, call_id="call_a")
    theirs += se.emit_simple_tool_call_delta(st, "{}") + se.emit_simple_tool_call_done(st)
    vllm_events = [e.model_dump(mode="json", exclude_none=True) for e in theirs]

    log = log_of(
        ("delta", d(reasoning="think", tokens=1)),
        ("delta", d("Hi")),
        ("delta", d(calls=[call(0, "{}", name="get_weather", call_id="call_a")], finish="tool_calls", tokens=2)),
        ("done", None),
    )
    ours = translate(log)[2:-1]
    assert types(ours) == types(vllm_events)
    # Optional fields one side leaves out: a reasoning item's empty content, logprobs.
    optional = {"content", "logprobs"}

    def fields(value: dict[str, Any]) -> set[str]:
        return {k for k, v in value.items() if v is not None}

    for mine, theirs_ in zip(ours, vllm_events, strict=True):
        assert fields(mine) == fields(theirs_), mine["type"]
        for key in ("item", "part"):
            if key in theirs_:
                assert fields(mine[key]) - optional == fields(theirs_[key]) - optional, (mine["type"], key)
        for key in ("output_index", "content_index", "delta", "text", "arguments", "name"):
            if key in theirs_:
                assert mine[key] == theirs_[key], (mine["type"], key)


# -- determinism and resumption ---------------------------------------------------------

NORMAL = ["plain", "reasoning", "text_tool", "two_tools", "length", "cancelled", "failed", "background"]


@pytest.mark.parametrize("name", NORMAL)
def test_same_log_same_events(name: str) -> None:
    log, m = SCENARIOS[name]
    first = translate(log, m)
    again = translate(copy.deepcopy(log), m)
    assert first == again
    # A log round-tripped through its wire form (as Redis keeps it) too.
    wire = [ChunkEvent.decode(ev.encode()) for ev in log]
    assert translate(wire, m) == first


@pytest.mark.parametrize("name", NORMAL)
def test_resumed_reader_gets_the_exact_tail(name: str) -> None:
    log, m = SCENARIOS[name]
    full = translate(log, m)
    for after in range(-1, len(full)):
        resumed = [e for e in translate(log, m) if e["sequence_number"] > after]
        assert resumed == full[after + 1 :], after


@pytest.mark.parametrize("name", NORMAL)
def test_live_reader_split_at_every_log_point(name: str) -> None:
    """A reader that read the log up to any point and left (what it had: a prefix of the
    stream), then came back with starting_after its last number: the two parts are the
    whole stream, nothing twice, nothing missing."""
    log, m = SCENARIOS[name]
    full = translate(log, m)
    for k in range(len(log) + 1):
        seen = translate(log[:k], m)
        assert seen == full[: len(seen)], k
        last = seen[-1]["sequence_number"]
        rest = [e for e in translate(log, m) if e["sequence_number"] > last]
        assert seen + rest == full, k


# -- superseded attempts ---------------------------------------------------------------

# A rich (tool call, structured output, reasoning) job is not continuable: a new attempt
# starts over. Attempt 1 said "Hel" and its worker was lost; attempt 2 answered "Hi!".
RESTARTED = log_of(
    ("delta", d("Hel"), 1),
    ("delta", d("Hi"), 2),
    ("delta", d("!", finish="stop"), 2),
    ("done", None, 2),
)
ATTEMPT_2_ONLY = log_of(("delta", d("Hi"), 2), ("delta", d("!", finish="stop"), 2), ("done", None, 2))


def numbers(events: list[dict[str, Any]]) -> list[int]:
    return [e["sequence_number"] for e in events]


def test_a_restart_drops_the_superseded_output_and_numbers_go_on() -> None:
    """Every reader numbers the same: the translator numbers attempt 1's events too, and
    drops its output when attempt 2 begins (what GET shows is attempt 2's alone)."""
    t = translator(continuable=False)
    events = t.start()
    for ev in RESTARTED:
        events += t.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
    assert numbers(events) == list(range(len(events)))
    final = events[-1]["response"]
    assert final["status"] == "completed" and len(final["output"]) == 1
    assert final["output"][0]["content"][0]["text"] == "Hi!" and final["output"][0]["id"] == f"msg_{BASE}_0"


def test_reader_after_the_restart_sees_only_the_last_attempt() -> None:
    events = translate(RESTARTED, continuable=False, attempt=2)
    assert types(events) == types(translate(ATTEMPT_2_ONLY, continuable=False, attempt=2))
    # The numbers are the log's for everyone: attempt 1's (skipped here) are not reused.
    skipped = translate(RESTARTED[:1], continuable=False, attempt=1)[len(START) :]
    assert set(numbers(events)).isdisjoint(numbers(skipped))
    final = events[-1]["response"]
    assert final["status"] == "completed" and len(final["output"]) == 1
    assert final["output"][0]["content"][0]["text"] == "Hi!"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi!"
    for event in events:
        check_event(event)


def test_reader_that_saw_attempt_1_gets_worker_lost() -> None:
    r = ResponseReader(translator(continuable=False), -1, 1)
    events = r.start()
    events += r.feed("delta", 1, [d("Hel")])
    assert types(events) == [*START, *TEXT_EVENTS]
    lost = r.feed("delta", 2, [d("Hi")])
    assert len(lost) == 1 and lost[0]["type"] == "error"
    error = check_event(lost[0])
    assert error.code == "worker_lost" and error.sequence_number == events[-1]["sequence_number"] + 1  # type: ignore[attr-defined]
    assert f"GET /v1/responses/{RID}" in error.message  # type: ignore[attr-defined]
    assert r.ended
    # The stream ends: attempt 2's rest and its end event give nothing more.
    assert r.feed("delta", 2, [d("!", finish="stop")]) == [] and r.feed("done", 2, [], USAGE) == []
    # The same from the log.
    assert translate(RESTARTED, continuable=False, attempt=1) == events + lost


def test_reader_that_saw_attempt_1_is_not_shown_a_later_attempts_end_as_its_own() -> None:
    """Attempt 2 ended (cancelled) before it sent anything: a reader that had attempt
    1's output gets the worker_lost error, not a final response holding that output
    (the response itself has none of it)."""
    log = log_of(("delta", d("Hel"), 1), ("done", "cancelled", 2))
    live = translate(log, continuable=False, attempt=1)
    assert live[-1]["type"] == "error" and live[-1]["code"] == "worker_lost"
    got = translate(log, continuable=False, attempt=2)[-1]["response"]  # what object_of reads
    assert got["status"] == "cancelled" and got["output"] == []


def test_resumed_reader_that_saw_attempt_1_does_not_get_a_mixture() -> None:
    """A reader followed attempt 1 up to its "Hel" delta and was disconnected; it comes
    back with starting_after that event's number once attempt 2 runs (the record says
    attempt 2): it gets the worker_lost error, not attempt 2's output joined to "Hel"."""
    seen = translate(RESTARTED[:1], continuable=False, attempt=1)
    after = seen[-1]["sequence_number"]
    assert seen[-1]["type"] == "response.output_text.delta" and seen[-1]["delta"] == "Hel"
    tail = translate(RESTARTED, continuable=False, attempt=2, after=after)
    assert types(tail) == ["error"] and tail[0]["code"] == "worker_lost", types(tail)


def test_resumed_reader_of_the_last_attempt_continues_it() -> None:
    """A reader that started after the restart and was cut off within attempt 2's
    output resumes it: exactly the events after its cursor (the numbers are the same
    for every reader)."""
    full = translate(RESTARTED, continuable=False, attempt=2)
    for k in range(len(START), len(full)):
        after = full[k - 1]["sequence_number"]
        assert translate(RESTARTED, continuable=False, attempt=2, after=after) == full[k:], k


def test_reader_before_any_output_skips_the_superseded_attempt() -> None:
    """A reader that had only the lifecycle events when the worker was lost resumes
    into the last attempt's output, without an error."""
    after = len(START) - 1
    tail = translate(RESTARTED, continuable=False, attempt=2, after=after)
    assert tail == translate(RESTARTED, continuable=False, attempt=2)[len(START) :]


def test_continuable_attempt_2_continues_the_same_message() -> None:
    log = log_of(("delta", d("Hel"), 1), ("delta", d("lo", finish="stop"), 2), ("done", None, 2))
    for attempt in (1, 2):
        events = translate(log, continuable=True, attempt=attempt)
        assert types(events) == [*START, *TEXT_EVENTS, "response.output_text.delta", *TEXT_DONE, "response.completed"]
        assert events == translate(PLAIN)
        output = events[-1]["response"]["output"]
        assert len(output) == 1 and output[0]["id"] == f"msg_{BASE}_0"
        assert output[0]["content"][0]["text"] == "Hello"


# -- the batch path: result_object and output_from_result -----------------------------


def result_of(log: list[ChunkEvent], rich: bool) -> ChoiceResult:
    """The job's result as the worker writes it: its text; for a rich job, its message
    as vLLM's parser reads the whole output."""
    whole = ChoiceDelta(index=0)
    for ev in log:
        for c in ev.choices:
            whole.extend(c)
    message = None
    if rich:
        calls = [{"id": c["id"], "type": "function", "function": dict(c["function"])} for c in (whole.tool_calls or [])]
        message = {"content": whole.text or None, "reasoning": whole.reasoning, "tool_calls": calls}
    return ChoiceResult(index=0, text=whole.text, finish_reason=whole.finish_reason, message=message)


def record_of(log: list[ChunkEvent], m: ResponseMeta, rich: bool) -> JobRecord:
    status = {"cancelled": JobStatus.cancelled}.get(result_of(log, rich).finish_reason or "", JobStatus.completed)
    return JobRecord(
        id=RID,
        model=MODEL,
        created=CREATED,
        finished=FINISHED,
        status=status,
        attempt=1,
        usage=USAGE,
        result=JobResult(choices=[result_of(log, rich)]),
        response=m.model_dump(mode="json"),
    )


@pytest.mark.parametrize(
    "name,rich",
    [
        ("plain", False),
        ("plain", True),
        ("reasoning", True),
        ("text_tool", True),
        ("two_tools", True),
        ("length", False),
        ("length", True),
    ],
)
def test_result_object_is_the_streams_final_response(name: str, rich: bool) -> None:
    log, m = SCENARIOS[name]
    streamed = translate(log, m)[-1]["response"]
    record = record_of(log, m, rich)
    items = output_from_result(record.result.choices[0], BASE)  # type: ignore[union-attr]
    assert items == streamed["output"]
    obj = result_object(record)
    check_response(obj)
    assert obj["output"] == streamed["output"]
    # The same object but for completed_at (the stream's translator does not know when it ended).
    assert {**obj, "completed_at": None} == {**streamed, "completed_at": None}
    assert obj["completed_at"] == (int(FINISHED) if obj["status"] == "completed" else None)


def test_result_object_of_a_cancelled_response() -> None:
    record = record_of(CANCELLED, meta(), rich=False)
    obj = result_object(record)
    assert obj["status"] == "cancelled" and obj["output"] == translate(CANCELLED)[-1]["response"]["output"]
    check_response(obj)


def test_result_object_of_a_failed_response() -> None:
    record = JobRecord(
        id=RID,
        model=MODEL,
        created=CREATED,
        finished=FINISHED,
        status=JobStatus.failed,
        error={"message": "it broke", "type": "server_error", "param": None, "code": "server_error"},
        response=meta().model_dump(mode="json"),
    )
    obj = result_object(record)
    assert obj["status"] == "failed" and obj["output"] == [] and obj["error"]["message"] == "it broke"
    check_response(obj)


# -- input items -> chat messages -------------------------------------------------------


def messages_of(value: Any) -> list[dict[str, Any]]:
    return items_to_messages(normalize_input(value, BASE))


def test_string_input_is_one_user_message() -> None:
    items = normalize_input("What is the capital of France?", BASE)
    assert items == [
        {
            "id": f"msg_{BASE}_in0",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "What is the capital of France?"}],
            "status": "completed",
        }
    ]
    assert items_to_messages(items) == [{"role": "user", "content": "What is the capital of France?"}]


def test_message_items_with_string_and_parts_content() -> None:
    value = [
        {"role": "user", "content": "plain"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "b"}, {"type": "input_text", "text": "c"}],
        },
        {"id": "msg_mine", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "d"}]},
    ]
    items = normalize_input(value, BASE)
    assert [i["id"] for i in items] == [f"msg_{BASE}_in0", f"msg_{BASE}_in1", f"msg_{BASE}_in2", "msg_mine"]
    assert items[3]["content"] == [{"type": "output_text", "text": "d", "annotations": []}]
    assert items_to_messages(items) == [
        {"role": "user", "content": "plain"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b\nc"},  # parts joined as vLLM joins a message's text parts
        {"role": "assistant", "content": "d"},
    ]


def test_system_developer_assistant_roles() -> None:
    value = [
        {"role": "system", "content": "sys"},
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert messages_of(value) == [
        {"role": "system", "content": "sys"},
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]


def test_function_call_and_output_items() -> None:
    value = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Rain"}]},
    ]
    items = normalize_input(value, BASE)
    assert [i["id"] for i in items][1:] == [f"fc_{BASE}_in1", f"fc_{BASE}_in2", f"fco_{BASE}_in3", f"fco_{BASE}_in4"]
    assert items_to_messages(items) == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rain"},
    ]
    # An assistant message followed by a call: one assistant turn with both.
    joined = messages_of(
        [
            {"role": "assistant", "content": "Let me check."},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    )
    assert joined == [
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }
    ]
    # The messages are ones chat takes.
    ChatCompletionRequest.model_validate({"model": "m", "messages": items_to_messages(items)})


def test_reasoning_items_attach_to_the_next_assistant_message() -> None:
    value = [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
    items = normalize_input(value, BASE)
    assert items[1]["id"] == f"rs_{BASE}_in1"
    assert items_to_messages(items) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "hmm"},
        {"role": "user", "content": "q2"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "thought",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]


def test_output_items_become_the_next_turns_history() -> None:
    """A response's output (reasoning, message, calls) as the next request's history."""
    output = translate(TEXT_TOOL)[-1]["response"]["output"]
    assert items_to_messages(output) == [
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
    ]
    output = translate(REASONING)[-1]["response"]["output"]
    assert items_to_messages(output) == [{"role": "assistant", "content": "Paris.", "reasoning": "Let me think"}]


def test_instructions_first_and_not_carried_over() -> None:
    history = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "ok"}]
    m = ResponseMeta(instructions="Be brief.", history=history, input=normalize_input("now", BASE))
    assert m.messages() == [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "now"},
    ]
    output = translate(PLAIN)[-1]["response"]["output"]
    nxt = m.next_history(output)
    assert nxt == [*history, {"role": "user", "content": "now"}, {"role": "assistant", "content": "Hello"}]
    assert all(msg.get("content") != "Be brief." for msg in nxt)
    assert ResponseMeta(input=normalize_input("x", BASE)).messages() == [{"role": "user", "content": "x"}]


# -- the chat request ---------------------------------------------------------------


def body_of(**kw: Any) -> dict[str, Any]:
    req = ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})
    body = chat_body(req, meta_of(req, BASE, []))
    ChatCompletionRequest.model_validate(body)  # chat takes it
    return body


def test_chat_body_plain() -> None:
    body = body_of(max_output_tokens=20, temperature=0, top_p=0.5)
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "temperature": 0,
        "top_p": 0.5,
    }
    assert body_of(instructions="sys")["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    extensions = body_of(seed=3, top_k=5, ignore_eos=True, min_tokens=2, stop=["x"], max_output_tokens=9)
    assert {k: extensions[k] for k in ("seed", "top_k", "ignore_eos", "min_tokens", "stop")} == {
        "seed": 3,
        "top_k": 5,
        "ignore_eos": True,
        "min_tokens": 2,
        "stop": ["x"],
    }


@pytest.mark.parametrize(
    "choice,expected",
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_chat_body_tools_and_tool_choice(choice: Any, expected: Any) -> None:
    body = body_of(tools=[TOOL], tool_choice=choice, parallel_tool_calls=False)
    [tool] = body["tools"]
    assert tool["type"] == "function"
    fn = {k: v for k, v in tool["function"].items() if k != "strict"}  # test_chat_tools_are_as_strict_as_shown
    assert fn == {"name": TOOL["name"], "description": TOOL["description"], "parameters": TOOL["parameters"]}
    assert body["tool_choice"] == expected and body["parallel_tool_calls"] is False


@pytest.mark.parametrize("strict", [None, True, False])
def test_chat_tools_are_as_strict_as_shown(strict: bool | None) -> None:
    """The response object shows each tool's `strict` (true when not given, OpenAI's
    default for Responses function tools); the chat request that answers it asks the
    engine for the same (vLLM pins a tool's arguments to its schema only when the tool
    says `strict: true`)."""
    tool = TOOL if strict is None else {**TOOL, "strict": strict}
    req = ResponsesRequest.model_validate({"model": "m", "input": "hi", "tools": [tool]})
    m = meta_of(req, BASE, [])
    shown = translator(m).snapshot()["tools"][0]["strict"]
    assert shown is (True if strict is None else strict)
    assert chat_body(req, m)["tools"][0]["function"].get("strict", False) is shown


def test_chat_body_tool_choice_none_without_tools() -> None:
    body = body_of(tool_choice="none")
    assert body["tool_choice"] == "none" and "tools" not in body


def test_chat_body_text_format() -> None:
    assert "response_format" not in body_of(text={"format": {"type": "text"}})
    assert body_of(text={"format": {"type": "json_object"}})["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "description": "a thing", "schema": schema, "strict": True}
    assert body_of(text={"format": fmt})["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "description": "a thing", "schema": schema, "strict": True},
    }


def test_chat_body_reasoning_effort() -> None:
    assert body_of(reasoning={"effort": "low"})["reasoning_effort"] == "low"
    assert "reasoning_effort" not in body_of(reasoning={"summary": "auto"})


def test_meta_is_what_the_response_object_shows() -> None:
    req = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": "hi",
            "instructions": "sys",
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_object"}},
            "metadata": {"k": "v"},
            "temperature": 0.5,
            "max_output_tokens": 7,
            "reasoning": {"effort": "low"},
        }
    )
    obj = translator(meta_of(req, BASE, [])).snapshot()
    check_response(obj)
    assert obj["tools"][0]["name"] == "get_weather" and obj["tools"][0]["strict"] is True
    assert obj["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert obj["text"] == {"format": {"type": "json_object"}} and obj["metadata"] == {"k": "v"}
    assert (obj["instructions"], obj["temperature"], obj["max_output_tokens"]) == ("sys", 0.5, 7)
    assert obj["reasoning"] == {"effort": "low", "summary": None}


# -- refusals, naming the field -----------------------------------------------------------


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    """The request model behind FastAPI's validation and the API's error handlers, as
    the real route has it (no services)."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/responses")
    async def create(body: ResponsesRequest) -> dict[str, Any]:
        return {"ok": True}

    return TestClient(app)


WEB = {"type": "web_search"}


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [WEB]}, "tools.0.type"),
        ({"tools": [TOOL, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools.1.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.name"),
        # A reasoning item's content or summary that is not a list (was a 500: iterated).
        ({"input": [{"type": "reasoning", "content": 5}, {"role": "user", "content": "hi"}]}, "input.0.content"),
        ({"input": [{"type": "reasoning", "summary": True}, {"role": "user", "content": "hi"}]}, "input.0.summary"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input.0.content.0.type",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "ok"},
                    {
                        "role": "user",
                        "content": [{"type": "input_text", "text": "a"}, {"type": "input_file", "file_id": "f"}],
                    },
                ]
            },
            "input.1.content.1.type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": []}, "input"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True, "store": False}, "background"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_refused_naming_the_field(app_client: TestClient, extra: dict[str, Any], param: str) -> None:
    body = {"model": "m", "input": "hi", **extra}
    r = app_client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    # The model alone: a pydantic error naming the field (its location, or `param` in its context).
    with pytest.raises(pydantic.ValidationError) as exc:
        ResponsesRequest.model_validate(body)
    first = exc.value.errors()[0]
    named = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("literal[", "dict[")))
    named = ".".join(p for p in (named, str((first.get("ctx") or {}).get("param", ""))) if p)
    assert named == param, first


@pytest.mark.parametrize(
    "extra",
    [
        {"include": []},
        {"include": None},
        {"truncation": "disabled"},
        {"top_logprobs": 0},
        {"conversation": None, "prompt": None, "instructions": None, "tools": None, "text": None},
        {"metadata": {f"k{i}": "v" for i in range(16)}},
        {"background": True},
        {"store": False},
        {"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}},
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}},
        {"user": "u", "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "k"},
        {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": "x"}]},
    ],
)
def test_accepted(app_client: TestClient, extra: dict[str, Any]) -> None:
    r = app_client.post("/v1/responses", json={"model": "m", "input": "hi", **extra})
    assert r.status_code == 200, r.text
