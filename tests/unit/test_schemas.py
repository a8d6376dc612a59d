"""Request validation and the job/event schemas (no services)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, ServiceError
from common.jobs import ChoiceDelta, ChunkEvent, JobRecord, JobRequest, JobStatus, SamplingSpec
from common.schemas import ChatCompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def req(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


def test_minimal_request_defaults():
    r = req()
    assert r.n == 1 and r.stream is False and r.requested_max_tokens is None and not r.include_usage


def test_stop_string_becomes_list():
    assert req(stop="x").stop == ["x"]
    assert req(stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("max_tokens", 0),
        ("max_completion_tokens", -3),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0),
        ("min_p", 1.2),
        ("top_k", -2),
        ("stop", [""]),
        ("stop", ["s"] * 5),
        ("top_logprobs", 3),  # without logprobs
        ("response_format", {"type": "xml"}),
        ("functions", [{"name": "f"}]),
        ("tool_choice", "required"),  # without tools
    ],
)
def test_invalid_parameters_rejected(field, value):
    with pytest.raises(ValidationError):
        req(**{field: value})


def test_stream_options_need_stream():
    with pytest.raises(ValidationError):
        req(stream_options={"include_usage": True})
    assert req(stream=True, stream_options={"include_usage": True}).include_usage


def test_messages_required_and_roles_checked():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}]})


def test_content_parts_and_roles_rendered_for_template():
    r = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "42", "tool_call_id": "t1"},
            ],
        }
    )
    # As vLLM hands them to a template (its chat_utils): parts joined by newlines, the
    # developer role kept (api.templates turns it into system for templates without it).
    rendered = [m.for_template() for m in r.messages]
    assert rendered[0] == {"role": "developer", "content": "be brief", "tools": None}
    assert rendered[1] == {"role": "user", "content": "a\nb"}
    assert rendered[2]["content"] == "" and rendered[2]["tool_calls"][0]["id"] == "t1"
    assert rendered[2]["tool_calls"][0]["function"]["arguments"] == {}
    assert rendered[3] == {"role": "tool", "content": "42", "tool_call_id": "t1"}


def test_image_parts_rejected():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            }
        )


def test_unknown_fields_ignored():
    assert req(user="u1", metadata={"a": 1}).model == "m"


def test_job_record_round_trip_through_redis_hash():
    rec = JobRecord(
        id="chatcmpl-x",
        model="m",
        request=JobRequest(prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=5, stop=["\n"])),
    )
    stored = {k.encode(): v.encode() for k, v in rec.to_redis().items()}
    back = JobRecord.from_redis(stored)
    assert back == rec and back.status is JobStatus.queued and not back.status.terminal


def test_chunk_event_round_trip():
    ev = ChunkEvent(seq=3, kind="delta", choices=[ChoiceDelta(index=0, text="hé", token_ids=[7])])
    assert ChunkEvent.decode(ev.encode().encode()) == ev


def test_errors_render_as_openai_objects():
    assert ContextLengthError("too long", param="messages").to_dict() == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert ModelNotFoundError("no").status_code == 404
    back = ServiceError.from_dict(InvalidRequestError("bad", param="x").to_dict())
    assert isinstance(back, InvalidRequestError) and back.status_code == 400 and back.param == "x"


def test_the_stop_limit_is_vllms():
    """vLLM's protocol classes (which validate a rich job: logprobs, tools, ...) refuse more
    than 4 stop sequences; the documented schema allowed 16, so the OpenAPI fuzz test
    found a schema-valid request refused. The schema, our validators and vLLM agree."""
    from pydantic import ValidationError as PydanticError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat

    from common.schemas import MAX_STOP

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    VllmChat.model_validate({**body, "stop": ["x"] * MAX_STOP})
    with pytest.raises(PydanticError):
        VllmChat.model_validate({**body, "stop": ["x"] * (MAX_STOP + 1)})
    ChatCompletionRequest.model_validate({**body, "stop": ["x"] * MAX_STOP})
    with pytest.raises(PydanticError):
        ChatCompletionRequest.model_validate({**body, "stop": ["x"] * (MAX_STOP + 1)})
    schema = ChatCompletionRequest.model_json_schema()["properties"]["stop"]
    assert [a.get("maxItems") for a in schema["anyOf"] if a.get("type") == "array"] == [MAX_STOP]
