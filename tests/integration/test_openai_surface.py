"""Issue 10 end to end with the official `openai` client on the real-engine session stack
(vLLM, the default model, greedy; the worker runs TOOL_CALL_PARSER=hermes): forced tool
calls, structured output, logprobs, /v1/completions (echo, logprobs, several prompts,
token ids, background and resume), batches of completions, and bad inputs refused
naming the parameter."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.integration.sse import read_sse

pytestmark = pytest.mark.integration


@pytest.fixture
async def ahttp(stack, api_key):
    auth = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=300, headers=auth) as h:
        yield h


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_call(client: openai.OpenAI, model: str, choice: str) -> None:
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice=tool_choice, temperature=0, max_tokens=60
    )
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].type == "function"
    json.loads(calls[0].function.arguments)  # JSON (its shape is the engine's business: the parity tests)
    assert r.choices[0].finish_reason in ("tool_calls", "stop")  # vLLM: "tool_calls" for required, "stop" named

    stream = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(calls[0].function.arguments)
    assert all(c.model_extra.get("seq") is not None for c in chunks[1:])


def test_tool_history_renders_and_answers(client: openai.OpenAI, model: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C."},
    ]
    r = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20
    )
    assert r.choices[0].message.content and r.usage.prompt_tokens > 20


def test_json_schema_answer_parses_and_validates(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
        temperature=0,
        max_tokens=60,
    )
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"city", "country"} and all(isinstance(v, str) for v in answer.values())


def test_logprobs_with_top_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    stream = list(
        client.chat.completions.create(
            model=model, messages=ASK, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_with_echo_and_logprobs(client: openai.OpenAI, model: str) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    text = r.choices[0].text
    assert text.startswith(prompt) and len(text) > len(prompt)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has none
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.total_tokens
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
    assert text == prompt + plain.choices[0].text


def test_completion_with_several_prompts_and_token_ids(client: openai.OpenAI, model: str, tokenizer) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    sampled = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0.8, n=2, seed=1)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    one = client.completions.create(model=model, prompt=ids[0], max_tokens=4, temperature=0)
    assert one.choices[0].text == r.choices[0].text
    chunks = list(client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0, stream=True))
    for index in (0, 1):
        streamed = "".join(x.text for c in chunks for x in c.choices if x.index == index)
        assert streamed == by_ids.choices[index].text


async def test_background_completion_and_resume(ahttp: httpx.AsyncClient, model: str) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "background": True}
    job = (await ahttp.post("/v1/completions", json=body)).json()
    assert job["id"].startswith("cmpl-") and job["object"] == "text_completion"
    assert job["status"] in ("queued", "in_progress")
    url = f"/v1/completions/{job['id']}/stream"
    whole = await read_sse(ahttp, "GET", url)
    assert whole.done and whole.id_lines  # the resume endpoint keeps `id:` lines
    text = "".join(c["choices"][0]["text"] for c in whole.chunks if c.get("choices"))
    cut = whole.ids[2]
    rest = await read_sse(ahttp, "GET", f"{url}?starting_after={cut}")
    rest_text = "".join(c["choices"][0]["text"] for c in rest.chunks if c.get("choices"))
    assert text.endswith(rest_text) and rest.ids[0] == cut + 1
    got = (await ahttp.get(f"/v1/completions/{job['id']}")).json()
    assert got["status"] == "completed" and got["choices"][0]["text"] == text
    # The chat routes do not know it (and the other way round).
    assert (await ahttp.get(f"/v1/chat/completions/{job['id']}")).status_code == 404


def test_batch_of_completions(client: openai.OpenAI, model: str) -> None:
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": p, "max_tokens": 5, "temperature": 0},
        }
        for i, p in enumerate(["The capital of France is", "Two plus two is"])
    ]
    lines.append({**lines[0], "custom_id": "bad", "body": {"model": model, "prompt": "x", "suffix": "y"}})
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = client.files.create(file=("c.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.time() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["c0", "c1"]
    assert all(o["response"]["body"]["object"] == "text_completion" for o in out)
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad" and errors[0]["response"]["body"]["error"]["param"] == "suffix"


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"logit_bias": {"99999999": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ("/v1/chat/completions", {"modalities": ["audio"]}, "modalities"),
        ("/v1/completions", {"suffix": "!"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": [99999999]}, "prompt"),
        ("/v1/completions", {"n": 2, "temperature": 0}, "n"),
    ],
)
def test_bad_inputs_are_400s_naming_the_parameter(http: httpx.Client, model: str, path: str, extra: dict, param: str):
    base = {"model": model, "messages": ASK} if "chat" in path else {"model": model, "prompt": "Hi"}
    resp = http.post(path, json={**base, "max_tokens": 3, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_nulls_are_accepted(http: httpx.Client, model: str) -> None:
    body = {"model": model, "messages": ASK, "max_tokens": 3, "n": None, "stream": None, "logprobs": None}
    resp = http.post("/v1/chat/completions", json={**body, "tools": None, "tool_choice": None, "user": None})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
