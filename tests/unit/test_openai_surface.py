"""Issue 10, the API side: the whole chat surface and /v1/completions validated as vLLM
validates them, chat templates rendered as `vllm serve` renders them, and job events
rendered as OpenAI's wire JSON (tool-call deltas, reasoning, logprobs, completions, the
`seq` field). No services."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.endpoints.chat import (
    ChatAdapter,
    JobView,
    check_tool_support,
    chunk_json,
    completion_object,
    delta_choice,
    job_object,
)
from api.endpoints.completions import CompletionAdapter
from api.errors import install_error_handlers
from api.templates import consolidate_system, content_format, render_arguments
from common.errors import InvalidRequestError
from common.jobs import (
    ChoiceDelta,
    ChoiceResult,
    ChunkEvent,
    JobOptions,
    JobRecord,
    JobRequest,
    JobResult,
    ModelCard,
    OutputSpec,
    SamplingSpec,
    extend_logprobs,
)
from common.schemas import ChatCompletionRequest, CompletionRequest, Usage
from common.settings import Settings

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


# -- validation: nulls, refusals naming the parameter ---------------------------------------


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def create(body: ChatCompletionRequest) -> dict[str, Any]:
        return {"ok": True}

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest) -> dict[str, Any]:
        return {"ok": True}

    return TestClient(app)


def test_openai_nulls_are_accepted(app_client: TestClient) -> None:
    body = {"model": "m", "messages": MSG}
    nulls = {
        k: None
        for k in (
            "n stream temperature top_p stop seed max_tokens max_completion_tokens presence_penalty "
            "frequency_penalty logprobs top_logprobs logit_bias response_format tools tool_choice "
            "parallel_tool_calls stream_options user metadata store service_tier functions function_call audio "
            "modalities prediction web_search_options reasoning_effort"
        ).split()
    }
    assert app_client.post("/v1/chat/completions", json={**body, **nulls}).status_code == 200
    r = chat(**nulls)
    assert r.n == 1 and r.stream is False and r.logprobs is False
    completion = {"model": "m", "prompt": "x", "n": None, "echo": None, "suffix": None, "best_of": None}
    assert app_client.post("/v1/completions", json=completion).status_code == 200


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"echo": True}, "echo"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"12": 150}}, "logit_bias"),
        ({"tools": []}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        # Refused by vLLM on the worker (after a stream's 200): refused up front.
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "x", "function": {}}]}]},
            "messages.0.tool_calls.0",
        ),
    ],
)
def test_refusals_name_the_parameter(app_client: TestClient, extra: dict[str, Any], param: str) -> None:
    resp = app_client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"logprobs": 30}, "logprobs"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ],
)
def test_completion_refusals_name_the_parameter(app_client: TestClient, extra: dict[str, Any], param: str) -> None:
    resp = app_client.post("/v1/completions", json={"model": "m", "prompt": "x", **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()


def test_harmless_fields_are_ignored_and_never_reach_the_worker() -> None:
    r = chat(user="u", metadata={"a": "b"}, store=True, service_tier="auto", temperature=0, background=True)
    assert r.vllm_body(7) == {"model": "m", "temperature": 0, "max_tokens": 7}


def test_tool_choice_defaults_to_auto_with_tools_and_null_stays_null() -> None:
    assert chat(tools=[TOOL]).tool_choice == "auto"
    assert chat(tools=[TOOL]).vllm_body(5)["tool_choice"] == "auto"
    explicit_null = chat(tools=[TOOL], tool_choice=None)
    assert explicit_null.tool_choice is None and explicit_null.vllm_body(5)["tool_choice"] is None
    assert chat(tools=[TOOL], tool_choice="none").tools_active is False


def test_the_worker_body_is_the_request_as_sent() -> None:
    r = chat(
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        logprobs=True,
        top_logprobs=2,
        max_completion_tokens=30,
        logit_bias={"5": 1},
    )
    body = r.vllm_body(12)
    assert body["max_tokens"] == 12 and "max_completion_tokens" not in body and "messages" not in body
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}  # OpenAI's name
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["tools"] == [TOOL] and body["logit_bias"] == {"5": 1.0} and body["top_logprobs"] == 2
    assert r.needs_output(None) and not chat().needs_output(None) and chat().needs_output("qwen3")
    c = CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 1, "echo": True})
    assert "best_of" not in c.vllm_body(16) and c.needs_output()


# -- template rendering -----------------------------------------------------------------------

TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.function.name }}:{{ c.function.arguments | tojson }}]"
    "{% endfor %}{% endif %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}</{{ m.role }}>{% endfor %}"
    "{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tools_and_tool_history_reach_the_template_as_vllm_passes_them() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    r = chat(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
                ],
            },
            {"role": "tool", "content": [{"type": "text", "text": "sunny"}], "tool_call_id": "c1"},
        ],
        tools=[TOOL],
        tool_choice="none",
        chat_template_kwargs={"enable_thinking": False, "unused": 1},
    )
    conversation, kwargs = render_arguments(r, TOOL_TEMPLATE)
    assert kwargs["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": None, "parameters": {"type": "object"}}}
    ]
    assert kwargs["enable_thinking"] is False and "unused" not in kwargs and kwargs["add_generation_prompt"] is True
    assert conversation[1]["tool_calls"][0]["function"]["arguments"] == {"city": "P"}  # a dict, as HF wants
    assert conversation[1]["content"] == "" and conversation[2] == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": "c1",
    }
    rendered, _ = render_jinja_template(conversations=[conversation], chat_template=TOOL_TEMPLATE, **kwargs)
    text = rendered[0]
    assert text.startswith('TOOLS:[{"type": "function"') and '[get_weather:{"city": "P"}]' in text
    assert "<tool>sunny#c1</tool>" in text and text.endswith("think=False<assistant>")


def test_reasoning_effort_switches_thinking_unless_given() -> None:
    _, kwargs = render_arguments(chat(reasoning_effort="none"), TOOL_TEMPLATE)
    assert kwargs["enable_thinking"] is False
    _, kwargs = render_arguments(
        chat(reasoning_effort="high", chat_template_kwargs={"enable_thinking": True}), TOOL_TEMPLATE
    )
    assert kwargs["enable_thinking"] is True


def test_developer_messages_become_one_system_message_for_templates_without_the_role() -> None:
    r = chat(messages=[{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, *MSG])
    conversation, _ = render_arguments(r, TOOL_TEMPLATE)
    assert conversation == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "hi"}]
    conversation, _ = render_arguments(r, TOOL_TEMPLATE + "{# 'developer' #}")
    assert conversation[1] == {"role": "developer", "content": "b", "tools": None}
    assert consolidate_system([{"role": "system", "content": "x"}, *MSG]) == [{"role": "system", "content": "x"}, *MSG]


def test_templates_looping_over_content_get_parts() -> None:
    looping = "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}"
    assert content_format(looping) == "openai" and content_format(TOOL_TEMPLATE) == "string"
    conversation, _ = render_arguments(chat(), looping)
    assert conversation == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


# -- what the model's workers can do -----------------------------------------------------------


def card(**kw: Any) -> ModelCard:
    return ModelCard(name="m", max_model_len=100, tokenizer_digest="d", created=1, **kw)


def test_tool_choices_need_the_workers_parsers() -> None:
    with pytest.raises(InvalidRequestError, match="ENABLE_AUTO_TOOL_CHOICE and TOOL_CALL_PARSER") as exc:
        check_tool_support(chat(tools=[TOOL]), card())
    assert exc.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match='tool_choice="required" requires TOOL_CALL_PARSER'):
        check_tool_support(chat(tools=[TOOL], tool_choice="required"), card())
    named = chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    with pytest.raises(InvalidRequestError, match='function "get_weather"'):
        check_tool_support(named, card())
    for ok in (chat(tools=[TOOL], tool_choice="none"), chat(tools=[TOOL], tool_choice=None), chat()):
        check_tool_support(ok, card())
    check_tool_support(named, card(tool_call_parser="hermes"))
    check_tool_support(chat(tools=[TOOL]), card(tool_call_parser="hermes", auto_tool_choice=True))


class FakeTokenizer:
    vocab_size = 1000

    def encode_chat(self, req: ChatCompletionRequest) -> list[int]:
        return [1, 2, 3]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FakeCatalog:
    def __init__(self, model_card: ModelCard):
        self.card = model_card

    async def get(self, model: str) -> tuple[ModelCard, FakeTokenizer]:
        return self.card, FakeTokenizer()


async def test_rich_chat_jobs_carry_the_output_spec() -> None:
    adapter = ChatAdapter(Settings(), pipeline=None, catalog=FakeCatalog(card(tool_call_parser="hermes")))  # type: ignore[arg-type]
    plain = await adapter.prepare(chat(max_tokens=5))
    assert plain.request is not None and plain.request.output is None and plain.request.continuable
    named = chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=5)
    rich = await adapter.prepare(named)
    assert rich.request is not None and rich.request.output is not None and not rich.request.continuable
    assert rich.request.output.api == "chat" and rich.request.output.body["max_tokens"] == 5
    with pytest.raises(InvalidRequestError) as exc:
        await adapter.prepare(chat(logit_bias={"1000": 1}))
    assert exc.value.param == "logit_bias"
    thinking = ChatAdapter(Settings(), pipeline=None, catalog=FakeCatalog(card(reasoning_parser="qwen3")))  # type: ignore[arg-type]
    record = await thinking.prepare(chat(max_tokens=5))
    assert record.request is not None and record.request.output is not None


async def test_completions_become_one_job_of_several_prompts() -> None:
    adapter = CompletionAdapter(Settings(), pipeline=None, catalog=FakeCatalog(card()))  # type: ignore[arg-type]
    record = await adapter.prepare(
        CompletionRequest.model_validate({"model": "m", "prompt": ["ab", "c"], "n": 2, "echo": True, "logprobs": 1})
    )
    req = record.request
    assert record.id.startswith("cmpl-") and req is not None
    assert req.prompts == [[97, 98], [99]] and req.choices == 4 and req.sampling.max_tokens == 16
    assert req.output is not None and req.output.api == "completion" and req.output.echo_texts == ["ab", "c"]
    ids = await adapter.prepare(CompletionRequest.model_validate({"model": "m", "prompt": [[104, 105]], "echo": True}))
    assert ids.request is not None and ids.request.output is not None and ids.request.output.echo_texts == ["hi"]
    lean = await adapter.prepare(CompletionRequest.model_validate({"model": "m", "prompt": [5, 6], "max_tokens": None}))
    assert lean.request is not None and lean.request.output is None and lean.request.sampling.max_tokens == 98
    with pytest.raises(InvalidRequestError) as exc:
        await adapter.prepare(CompletionRequest.model_validate({"model": "m", "prompt": [5, 1000]}))
    assert exc.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as exc:  # 99 + 16 > 100
        await adapter.prepare(CompletionRequest.model_validate({"model": "m", "prompt": "x" * 99}))
    assert exc.value.param == "max_tokens"
    # n × prompts is bounded (MAX_PROMPTS): each prompt is a vLLM request of its own, the
    # job counted once (before: up to 2048 prompts × MAX_N choices in one request).
    few = CompletionAdapter(Settings(max_prompts=4), pipeline=None, catalog=FakeCatalog(card()))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError) as exc:
        await few.prepare(CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b", "c"], "n": 2}))
    assert exc.value.param == "prompt" and exc.value.code == "array_above_max_length"
    await few.prepare(CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "n": 2}))


# -- rendering events and results ------------------------------------------------------------

CHAT = JobView(id="chatcmpl-1", model="m", created=1, n=1, include_usage=False, background=False, continuable=False)
CMPL = JobView(id="cmpl-1", model="m", created=1, n=2, include_usage=True, background=False, kind="completion")


def test_tool_call_reasoning_and_logprob_deltas_render_as_openai_streams_them() -> None:
    call = {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert delta_choice(CHAT, ChoiceDelta(index=0, tool_calls=[call])) == {
        "index": 0,
        "delta": {"tool_calls": [call]},
        "logprobs": None,
        "finish_reason": None,
    }
    thought = delta_choice(CHAT, ChoiceDelta(index=0, reasoning="hmm", text="ok"))
    assert thought is not None and thought["delta"] == {"reasoning": "hmm", "reasoning_content": "hmm", "content": "ok"}
    lp = {"content": [{"token": "ok", "logprob": -0.1, "bytes": [111, 107], "top_logprobs": []}]}
    assert delta_choice(CHAT, ChoiceDelta(index=0, text="ok", logprobs=lp))["logprobs"] == lp  # type: ignore[index]
    assert delta_choice(CHAT, ChoiceDelta(index=0, token_ids=[5])) is None
    end = delta_choice(CHAT, ChoiceDelta(index=0, finish_reason="tool_calls"))
    assert end == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None}


def test_completion_chunks() -> None:
    lp = {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}], "text_offset": [0]}
    choice = delta_choice(CMPL, ChoiceDelta(index=1, text="a", logprobs=lp))
    body = json.loads(chunk_json(CMPL, [choice], seq=4))  # type: ignore[list-item]
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 1, "text": "a", "logprobs": lp, "finish_reason": None}],
        "usage": None,
        "seq": 4,
    }
    # Tokens whose text the detokenizer holds back still get their chunk, as vLLM's (before:
    # none, and a job whose every token was held back streamed only its finish, which a
    # keep-alive comment next to it could hide from vLLM's benchmark client).
    held = delta_choice(CMPL, ChoiceDelta(index=0, text="", token_ids=[7]))
    assert held == {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
    assert delta_choice(CMPL, ChoiceDelta(index=0)) is None


def record(kind: str, choices: list[ChoiceResult], output: OutputSpec | None = None) -> JobRecord:
    return JobRecord(
        id="chatcmpl-1" if kind == "chat" else "cmpl-1",
        model="m",
        request=JobRequest(prompt_token_ids=[1], sampling=SamplingSpec(max_tokens=5), output=output),
        options=JobOptions(),
        result=JobResult(choices=choices),
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )


def test_results_render_the_parsed_message() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    message = {"content": None, "reasoning": "because", "tool_calls": [call], "finish_reason": "tool_calls"}
    rich = record("chat", [ChoiceResult(index=0, text="", finish_reason="stop", message=message)], OutputSpec())
    out = completion_object(rich)
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "reasoning": "because",
        "reasoning_content": "because",
        "tool_calls": [call],
    }
    plain = completion_object(record("chat", [ChoiceResult(index=0, text="hi", finish_reason="stop")]))
    assert plain["choices"][0]["message"]["content"] == "hi" and "tool_calls" not in plain["choices"][0]["message"]
    lp = {"tokens": ["x"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    prompt_lp = [None, {"7": {"logprob": -1.5, "rank": 3, "decoded_token": "p"}}]
    cmpl = record(
        "completion",
        [
            ChoiceResult(
                index=0, text="px", finish_reason="stop", logprobs=lp, stop_reason="y", prompt_logprobs=prompt_lp
            )
        ],
    )
    cmpl.request.output = OutputSpec(api="completion")  # type: ignore[union-attr]
    got = job_object(cmpl)
    # vLLM's extensions: what stopped it, and the prompt's logprobs (echo).
    assert got["object"] == "text_completion" and got["choices"] == [
        {
            "index": 0,
            "text": "px",
            "logprobs": lp,
            "finish_reason": "stop",
            "stop_reason": "y",
            "prompt_logprobs": prompt_lp,
        }
    ]


async def test_a_restarted_rich_job_ends_a_stream_that_showed_output_with_an_error() -> None:
    from tests.unit.test_chat_adapter import ScriptedService, drain

    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a'}}
    events = [
        ChunkEvent(seq=0, kind="delta", choices=[ChoiceDelta(index=0, tool_calls=[call])]),
        ChunkEvent(seq=1, kind="delta", attempt=2, choices=[ChoiceDelta(index=0, tool_calls=[call])]),
    ]
    out = await drain(ScriptedService(events).stream(CHAT))
    datas = [json.loads(o["data"]) for o in out[:-1]]
    assert datas[1]["choices"][0]["delta"]["tool_calls"] == [call]
    assert datas[-1]["error"]["code"] == "worker_lost" and out[-1]["data"] == "[DONE]"
    assert sum("tool_calls" in json.dumps(d) for d in datas) == 1  # never the second attempt's partial call
    # A continuable job's new attempt goes on.
    continuable = JobView(**{**CHAT.__dict__, "continuable": True})
    out = await drain(ScriptedService(events).stream(continuable))
    assert json.loads(out[-2]["data"])["attempt"] == 2


def test_card_defaults_keep_old_workers_plain() -> None:
    assert card().tool_call_parser is None and SimpleNamespace is not None


def test_logprobs_gather_in_place_without_aliasing() -> None:
    """A long answer's logprobs grow in place (copying them per step was quadratic: 0.7 s
    of the worker's loop for 16k tokens), and what is added is never kept by reference."""
    first = {"content": [{"token": "a"}]}
    gathered = extend_logprobs(None, first)
    first["content"].append({"token": "changed"})
    more = {"content": [{"token": "b"}]}
    assert extend_logprobs(gathered, more) is gathered
    more["content"].append({"token": "changed"})
    assert gathered == {"content": [{"token": "a"}, {"token": "b"}]}
    cmpl = extend_logprobs(None, {"tokens": ["x"], "text_offset": [0]})
    extend_logprobs(cmpl, {"tokens": ["y"], "text_offset": [1]})
    assert cmpl == {"tokens": ["x", "y"], "text_offset": [0, 1]}
