"""Parity with `vllm serve` (issue 10, requirement 8): vLLM's own OpenAI server runs on the
same checkpoint with the same engine settings as the llmq worker (scripts/vllm_serve.py),
and the same greedy requests go to both through the official openai client: chat (plain,
stop, n, logprobs, a strict json_schema, named and `required` tool calls, a tool-result round
trip) and /v1/completions (plain, echo with logprobs, several prompts), each streamed and
not. The answers must be equal: every field of the response except those that are random or
ours (`id` beyond its prefix, `created`, `system_fingerprint`, our `seq`, the random part of
tool-call ids); floats (logprobs) within ABS_TOL. A streamed answer is reassembled (strings
joined, tool-call deltas merged by index, lists extended) and compared with vllm serve's
reassembled stream, and so is its chunk structure: per choice, the sequence of the kinds of
fields its chunks carry (role first, a tool call's id and name before its argument
fragments, the finish chunk, the usage chunk last), consecutive repeats collapsed.

The default model neither thinks nor calls tools on its own: reasoning and `auto` tool
choice are covered with real token streams in the worker's parser tests, not here. Named
and `required` tool choice and json_schema work on it because vLLM constrains its output.

`vllm bench serve` (vLLM's own benchmark client) runs against the stack too, with its default
backend (/v1/completions) and with openai-chat: no request may fail (test_vllm_bench_client).

PARITY_SUBJECT=vllm points the "llmq" side at vllm serve as well, without starting the
stack: every test must pass then (a self-check of this harness).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from common.settings import get_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_vllm_client import run_vllm_bench  # noqa: E402
from vllm_serve import VllmServe  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = get_settings().model_name
SELF_CHECK = os.environ.get("PARITY_SUBJECT", "llmq") == "vllm"
ABS_TOL = 1e-3
# Random or ours: never compared. `id` is compared by its prefix only (see normalize).
IGNORED = {"created", "system_fingerprint", "seq"}

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
ROUND_TRIP = [
    *WEATHER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0123456789",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789", "content": "Sunny, 22 degrees Celsius."},
]

# Greedy and short: every request runs four times (two servers, streamed and not) on a CPU.
CHAT_CASES: dict[str, dict[str, Any]] = {
    "plain": {"messages": QUESTION, "max_tokens": 24},
    "stop": {"messages": QUESTION, "max_tokens": 24, "stop": ["Paris"]},
    # vllm serve refuses n > 1 when greedy (test_greedy_n_refused): sampled, with a seed.
    "n2": {"messages": QUESTION, "max_tokens": 12, "n": 2, "temperature": 0.8, "seed": 1234},
    "logprobs": {"messages": QUESTION, "max_tokens": 8, "logprobs": True, "top_logprobs": 3},
    "json_schema": {
        "messages": [{"role": "user", "content": "Give the capital of France as JSON."}],
        "max_tokens": 48,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CITY_SCHEMA, "strict": True},
        },
    },
    "tool_named": {
        "messages": WEATHER,
        "max_tokens": 48,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "tool_required": {"messages": WEATHER, "max_tokens": 48, "tools": TOOLS, "tool_choice": "required"},
    "tool_round_trip": {"messages": ROUND_TRIP, "max_tokens": 32, "tools": TOOLS},
}
COMPLETION_CASES: dict[str, dict[str, Any]] = {
    "plain": {"prompt": "The capital of France is", "max_tokens": 16},
    "echo_logprobs": {"prompt": "The capital of France is", "max_tokens": 6, "echo": True, "logprobs": 3},
    "prompt_list": {"prompt": ["The capital of France is", "Water boils at"], "max_tokens": 8},
}


# --- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[VllmServe]:
    """vLLM's own server, for this module only (one engine more on a small machine). It
    starts while the session stack does (if that is not up yet)."""
    server = VllmServe(log_path=tmp_path_factory.mktemp("vllm-serve") / "vllm-serve.log")
    server.spawn()
    try:
        if not SELF_CHECK:
            request.getfixturevalue("stack")
        server.wait_healthy(timeout=600)
    except BaseException:
        sys.stderr.write(f"--- vllm serve (tail) ---\n{server.log_tail()}\n")
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ref(vllm_server: VllmServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def subject_url(request: pytest.FixtureRequest) -> str:
    """The base URL of the server under test: llmq's session stack (or vllm serve itself)."""
    if SELF_CHECK:
        return str(request.getfixturevalue("vllm_server").url)
    return str(request.getfixturevalue("stack").api_url)


@pytest.fixture(scope="module")
def subject_key(request: pytest.FixtureRequest) -> str:
    return "unused" if SELF_CHECK else str(request.getfixturevalue("api_key"))


@pytest.fixture(scope="module")
def subject(subject_url: str, subject_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=subject_url + "/v1", api_key=subject_key, max_retries=0, timeout=300)


# --- comparison ---------------------------------------------------------------------------


def _tool_call_id_shape(value: str) -> str:
    """A tool-call id without its random part: `chatcmpl-tool-8ab1e3b3c649fa0e` -> `chatcmpl-tool-*`."""
    return re.sub(r"[0-9A-Za-z]{8,}$", "*", value)


def normalize(obj: Any, path: str = "") -> Any:
    """Nulls dropped (an absent field and a null are the same to a client), ignored fields
    dropped, random ids reduced to their shape."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if value is None or key in IGNORED:
                continue
            if key == "id" and isinstance(value, str):
                # The response id: its prefix (chatcmpl-, cmpl-); a tool call's: its shape.
                out[key] = _tool_call_id_shape(value) if ".tool_calls" in path else value.split("-", 1)[0]
                continue
            out[key] = normalize(value, f"{path}.{key}")
        return out
    if isinstance(obj, list):
        return [normalize(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def differences(a: Any, b: Any, path: str = "$", out: list[str] | None = None) -> list[str]:
    """Where `b` (llmq) differs from `a` (vllm serve); floats within ABS_TOL."""
    out = [] if out is None else out
    if (
        isinstance(a, float | int)
        and isinstance(b, float | int)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        if isinstance(a, float) or isinstance(b, float):
            if abs(a - b) > ABS_TOL:
                out.append(f"{path}: vllm serve {a!r}, llmq {b!r}")
        elif a != b:
            out.append(f"{path}: vllm serve {a!r}, llmq {b!r}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() - b.keys()):
            out.append(f"{path}.{key}: vllm serve {a[key]!r}, llmq has no such field")
        for key in sorted(b.keys() - a.keys()):
            out.append(f"{path}.{key}: llmq {b[key]!r}, vllm serve has no such field")
        for key in sorted(a.keys() & b.keys()):
            differences(a[key], b[key], f"{path}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: vllm serve has {len(a)} items, llmq {len(b)}: {_short(a)} / {_short(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            differences(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: vllm serve {a!r}, llmq {b!r}")
    return out


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def assert_same(ref_answer: Any, llmq_answer: Any, what: str) -> None:
    diffs = differences(ref_answer, llmq_answer)
    assert not diffs, f"{what}: llmq differs from vllm serve in {len(diffs)} place(s):\n" + "\n".join(diffs[:30])


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Merge a streamed delta as a client does: strings joined, dicts merged, lists of
    indexed items (tool calls) merged by index, other lists extended, the rest replaced."""
    for key, value in delta.items():
        if value is None:
            continue
        if key not in acc:
            acc[key] = copy.deepcopy(value)
        elif isinstance(value, str) and isinstance(acc[key], str):
            acc[key] += value
        elif isinstance(value, dict) and isinstance(acc[key], dict):
            merge_delta(acc[key], value)
        elif isinstance(value, list) and isinstance(acc[key], list):
            if value and all(isinstance(v, dict) and "index" in v for v in value):
                for item in value:
                    slot = next((s for s in acc[key] if s.get("index") == item["index"]), None)
                    if slot is None:
                        acc[key].append(copy.deepcopy(item))
                    else:
                        merge_delta(slot, {k: v for k, v in item.items() if k != "index"})
            else:
                acc[key].extend(copy.deepcopy(value))
        else:
            acc[key] = copy.deepcopy(value)


def _kinds(value: Any, prefix: str = "") -> list[str]:
    """The kinds of the fields a delta carries: `content`, `content=''`, `tool_calls[0].id`, ..."""
    kinds: list[str] = []
    if isinstance(value, dict):
        for key in sorted(value):
            v = value[key]
            if v is None or key == "index":
                continue
            name = f"{prefix}{key}"
            if isinstance(v, dict):
                kinds += _kinds(v, name + ".") or [name + "={}"]
            elif key == "tool_calls" and isinstance(v, list):
                for tc in v:
                    kinds += _kinds(tc, f"{name}[{tc.get('index')}].")
            elif isinstance(v, str) and v == "":
                kinds.append(name + "=''")
            else:
                kinds.append(name)
    return kinds


def _collapse(seq: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def reassemble(chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stream's chunks as one answer (choices merged by index), and its structure: per
    choice the collapsed sequence of its chunks' field kinds, and where usage came."""
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    per_choice: dict[int, list[tuple[str, ...]]] = {}
    order: list[str] = []
    for chunk in chunks:
        chunk = normalize(chunk)
        for key, value in chunk.items():
            if key == "choices":
                continue
            if key == "usage":
                top["usage"] = value  # the last one counts
                continue
            seen = top.setdefault("chunk." + key, [])
            if value not in seen:
                seen.append(value)  # id, object, model: the same in every chunk
        usage = "usage" in chunk
        for choice in chunk.get("choices", []):
            index = choice["index"]
            merge_delta(choices.setdefault(index, {"index": index}), choice)
            per_choice.setdefault(index, []).append(tuple(_kinds(choice)))
            order.append(f"choice{index}")
        if usage:
            order.append("usage")
        if not chunk.get("choices") and not usage:
            order.append("empty")
    answer = {**top, "choices": [choices[i] for i in sorted(choices)]}
    structure = {
        "choices": {i: _collapse(k) for i, k in sorted(per_choice.items())},
        # Choices may interleave differently; what comes last may not.
        "last": order[-1:] if order else [],
        "empty_chunks": order.count("empty"),
    }
    return answer, structure


def _dump(obj: Any) -> dict[str, Any]:
    return obj.model_dump(mode="json", exclude_unset=False)


def ask(client: openai.OpenAI, kind: str, body: dict[str, Any], stream: bool) -> Any:
    create: Callable[..., Any] = client.chat.completions.create if kind == "chat" else client.completions.create
    params = {"model": MODEL, "temperature": 0, **body}
    if not stream:
        return normalize(_dump(create(**params)))
    chunks = [_dump(c) for c in create(**params, stream=True, stream_options={"include_usage": True})]
    return reassemble(chunks)


def compare(ref: openai.OpenAI, subject: openai.OpenAI, kind: str, body: dict[str, Any], stream: bool) -> Any:
    """Ask both; assert the answers (and streams' structures) equal; vllm serve's answer."""
    expected = ask(ref, kind, body, stream)
    got = ask(subject, kind, body, stream)
    if stream:
        assert_same(expected[0], got[0], "reassembled stream")
        assert_same(expected[1], got[1], "stream structure")
        return expected[0]
    assert_same(expected, got, "answer")
    return expected


def _message(answer: dict[str, Any], index: int = 0) -> dict[str, Any]:
    choice = answer["choices"][index]
    return dict(choice.get("message") or choice.get("delta") or {})


# --- chat ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_parity(ref: openai.OpenAI, subject: openai.OpenAI, case: str, stream: bool) -> None:
    body = CHAT_CASES[case]
    answer = compare(ref, subject, "chat", body, stream)
    # What vllm serve answered must be what the case is about (else parity proves little).
    message = _message(answer)
    if case == "plain":
        assert message["content"].startswith("The capital of France is Paris")
    elif case == "stop":
        assert "Paris" not in message["content"] and answer["choices"][0]["finish_reason"] == "stop"
    elif case == "n2":
        assert [c["index"] for c in answer["choices"]] == [0, 1]
    elif case == "logprobs":
        assert len(answer["choices"][0]["logprobs"]["content"]) == answer["usage"]["completion_tokens"]
        assert all(len(t["top_logprobs"]) == 3 for t in answer["choices"][0]["logprobs"]["content"])
    elif case == "json_schema":
        jsonschema.validate(json.loads(message["content"]), CITY_SCHEMA)
    elif case in ("tool_named", "tool_required"):
        calls = message["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert all(c["id"] and c["type"] == "function" for c in calls)
        assert answer["choices"][0]["finish_reason"] == ("stop" if case == "tool_named" else "tool_calls")
    elif case == "tool_round_trip":
        assert "22" in message["content"] and not message.get("tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_n_refused(ref: openai.OpenAI, subject: openai.OpenAI, stream: bool) -> None:
    """vllm serve answers n=2 at temperature 0 with a 400 ("n must be 1 when using greedy
    sampling, got 2."): so must llmq, before any stream starts."""
    errors, bodies = [], []
    for client in (ref, subject):
        with pytest.raises(openai.APIError) as info:
            ask(client, "chat", {"messages": QUESTION, "max_tokens": 4, "n": 2}, stream)
        exc = info.value
        errors.append((type(exc).__name__, getattr(exc, "status_code", None), exc.message))
        bodies.append(exc.body)
    assert errors[0][0] == "BadRequestError"
    # The same refusal (class, status, vLLM's words); llmq's error object is OpenAI's
    # (`type: invalid_request_error`, `param` naming the field) where vLLM's is its own.
    assert errors[0][:2] == errors[1][:2], f"vllm serve: {errors[0]} {bodies[0]}; llmq: {errors[1]} {bodies[1]}"
    assert "n must be 1 when using greedy sampling" in errors[0][2]
    assert "n must be 1 when using greedy sampling" in errors[1][2]
    assert isinstance(bodies[1], dict) and bodies[1].get("param") == "n"


# --- completions --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(COMPLETION_CASES))
def test_completions_parity(ref: openai.OpenAI, subject: openai.OpenAI, case: str, stream: bool) -> None:
    body = COMPLETION_CASES[case]
    answer = compare(ref, subject, "completions", body, stream)
    texts = [c["text"] for c in answer["choices"]]
    if case == "echo_logprobs":
        assert texts[0].startswith(body["prompt"] + " Paris")
        logprobs = answer["choices"][0]["logprobs"]
        # The prompt's tokens come first, the first of them without a logprob.
        assert logprobs["tokens"][0] == "The" and logprobs["token_logprobs"][0] is None
    elif case == "prompt_list":
        assert len(texts) == 2 and texts[0].startswith(" Paris")


# --- vLLM's benchmark client --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_vllm_bench_client(subject_url: str, subject_key: str, backend: str, tmp_path: Path) -> None:
    """`vllm bench serve` with its default backend (/v1/completions, streamed) and with
    openai-chat: its SSE parser takes only `data: <json>` messages separated by a blank line
    (see bench/bench_vllm_client.py); every request must succeed."""
    result = run_vllm_bench(
        subject_url,
        backend=backend,
        model=MODEL,
        tokenizer=get_settings().model_path,
        num_prompts=16,
        input_len=32,
        output_len=8,
        api_key=subject_key,
        result_dir=tmp_path,
    )
    assert result["failed"] == 0 and result["completed"] == 16, (
        f"vllm bench serve --backend {backend}: {result['failed']} failed, {result['completed']} completed; "
        f"errors: {result.get('errors', [])[:3]}\n{result.get('log_tail', '')}"
    )
    # The random dataset asks for ignore_eos: every request gives exactly output_len tokens.
    short = [(n, text) for n, text in zip(result["output_lens"], result["generated_texts"], strict=True) if n != 8]
    assert not short, f"vllm bench serve --backend {backend}: answers of other lengths than 8 tokens: {short[:5]}"
