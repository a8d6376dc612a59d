"""The Responses API on the real engine (the session stack: vLLM, the default model,
greedy; the worker runs TOOL_CALL_PARSER=hermes), with the official `openai` client: what
only the engine can show. A response answers as chat does for the same messages; its
stream adds up to it and ends with the object `retrieve` gives; `text.format` and a
forced tool call give what they promise; a budget cut short is `incomplete`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

ASK = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": ASK}]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def chat_answer(client: openai.OpenAI, model: str):
    return client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=20)


def test_create_answers_as_chat_does(client: openai.OpenAI, model: str, chat_answer) -> None:
    r = client.responses.create(model=model, input=ASK, temperature=0, max_output_tokens=20)
    choice = chat_answer.choices[0]
    assert choice.finish_reason == "stop", "the question should be answered within 20 tokens"
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model
    assert r.status == "completed" and r.error is None and r.incomplete_details is None
    assert r.output_text == choice.message.content and "Paris" in r.output_text
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        chat_answer.usage.prompt_tokens,
        chat_answer.usage.completion_tokens,
        chat_answer.usage.total_tokens,
    )
    assert r.completed_at is not None and r.completed_at >= r.created_at
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_stream_adds_up_and_ends_with_the_retrieved_object(client: openai.OpenAI, model: str, chat_answer) -> None:
    events = list(client.responses.create(model=model, input=ASK, temperature=0, max_output_tokens=20, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == chat_answer.choices[0].message.content
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == text
    assert final.response.usage.output_tokens == chat_answer.usage.completion_tokens
    got = client.responses.retrieve(final.response.id).model_dump()
    streamed = final.response.model_dump()
    assert {**streamed, "completed_at": None} == {**got, "completed_at": None}
    # The stream's last response says when it completed, as retrieve does.
    assert streamed["completed_at"] == got["completed_at"]


def test_json_schema_format_gives_valid_json(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=model,
        input="Name a city and its country as JSON.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    assert r.status == "completed", r.incomplete_details
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "place"


@pytest.fixture(scope="module")
def forced_call(client: openai.OpenAI, model: str):
    return client.responses.create(
        model=model,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=60,
    )


def test_forced_tool_choice_gives_a_function_call(forced_call) -> None:
    r = forced_call
    assert r.status == "completed", r.incomplete_details
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_") and call.status == "completed"
    json.loads(call.arguments)  # JSON (its shape is the engine's business, as on chat)
    assert r.tool_choice.type == "function" and r.tool_choice.name == "get_weather"


def test_a_tool_shown_strict_gets_arguments_of_its_schema(forced_call) -> None:
    """The response shows the tool as `strict: true` (OpenAI's default for Responses
    function tools when not given): its arguments then follow its parameters schema."""
    r = forced_call
    [tool] = r.tools
    assert tool.strict is True
    call = next(item for item in r.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_small_budget_with_ignore_eos_is_incomplete(client: openai.OpenAI, model: str) -> None:
    r = client.responses.create(
        model=model, input=ASK, temperature=0, max_output_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3
    assert r.output and r.output[-1].status == "incomplete"
