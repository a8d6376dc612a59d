"""The worker's rich output path (worker/openai_output.py) on real token streams: the
default model's tokenizer (loaded by vLLM's tokenizer loader) and vLLM's real parsers, fed
one token per engine step as the engine would, without an engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput as VllmCompletionOutput  # noqa: E402
from vllm.outputs import RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.tokenizers import get_tokenizer  # noqa: E402

from common.jobs import ChoiceDelta, JobRequest, OutputSpec, SamplingSpec  # noqa: E402
from common.settings import Settings  # noqa: E402
from worker.chat_template import with_chat_template  # noqa: E402
from worker.openai_output import REQUEST_ERRORS, OpenAIFrontend, ParserConfigError, check_parser_names  # noqa: E402

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
PROMPT = [1, 9690, 198]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip("the default model is not installed (make model)")
    return get_tokenizer(str(MODEL))


def job(body: dict[str, Any], api: str = "chat", n: int = 1, max_tokens: int = 64, **output: Any) -> JobRequest:
    return JobRequest(
        prompt_token_ids=PROMPT,
        sampling=SamplingSpec(n=n, max_tokens=max_tokens),
        output=OutputSpec(api=api, body={"max_tokens": max_tokens, **body}, **output),  # type: ignore[arg-type]
    )


def stream(
    tokenizer: Any,
    frontend: OpenAIFrontend,
    request: JobRequest,
    text: str,
    finish: str = "stop",
    logprobs: bool = False,
) -> list[ChoiceDelta]:
    """Feed `text`'s tokens one per engine step (choice 0), as vLLM's DELTA outputs."""
    rich = frontend.prepare(request)
    processor = frontend.processor(rich, request, 0)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out: list[ChoiceDelta] = []
    for k, token in enumerate(ids):
        last = k == len(ids) - 1
        lp = [{token: Logprob(logprob=-0.25 * (k % 3), rank=1, decoded_token=tokenizer.decode([token]))}]
        output = VllmCompletionOutput(
            index=0,
            text=tokenizer.decode([token]),
            token_ids=[token],
            cumulative_logprob=None,
            logprobs=lp if logprobs else None,
            finish_reason=finish if last else None,
        )
        res = RequestOutput("r", None, PROMPT, None, [output], finished=last)
        out.extend(processor.process(res))
    return out


def merged(deltas: list[ChoiceDelta]) -> ChoiceDelta:
    whole = ChoiceDelta(index=deltas[0].index)
    for d in deltas:
        whole.extend(d)
    return whole


def test_hermes_tool_call_streams_and_final_message(tokenizer):
    """tool_choice auto, the model writes a hermes tool call: vLLM's hermes parser turns
    it into OpenAI tool-call deltas (id, name, then argument fragments), the stream ends
    with finish_reason tool_calls, and the message (vLLM's non-streaming parse) holds the
    same call with the id streamed."""
    frontend = OpenAIFrontend.build(tokenizer, tool_call_parser="hermes")
    assert frontend.enable_auto_tools
    request = job({"tools": TOOLS, "tool_choice": "auto"})
    rich = frontend.prepare(request)
    # hermes's adjust_request keeps special tokens (vLLM's renderer calls it).
    assert rich.params[0].skip_special_tokens is False
    assert rich.params[0].output_kind == RequestOutputKind.DELTA
    deltas = stream(tokenizer, frontend, request, TOOL_CALL)
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("chatcmpl-tool-")
    assert calls[0]["function"] == {"name": "get_weather"}
    fragments = [c["function"]["arguments"] for c in calls[1:]]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert "".join(d.text for d in deltas) == ""
    assert deltas[-1].finish_reason == "tool_calls"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert sum(len(d.token_ids) for d in deltas) == len(tokenizer.encode(TOOL_CALL, add_special_tokens=False))
    whole = merged(deltas)
    assert whole.tool_calls == [
        {
            "index": 0,
            "id": calls[0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    message = deltas[-1].message
    assert message is not None
    assert message["content"] is None and message["reasoning"] is None
    assert message["tool_calls"] == [
        {
            "id": calls[0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert message["finish_reason"] == "tool_calls"


def test_plain_text_with_tools_and_length_finish(tokenizer):
    """No tool call in the text: content streams as is; finish reasons stay vLLM's."""
    frontend = OpenAIFrontend.build(tokenizer, tool_call_parser="hermes")
    deltas = stream(tokenizer, frontend, job({"tools": TOOLS}), "The weather is fine.", finish="length")
    assert "".join(d.text for d in deltas) == "The weather is fine."
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].message == {
        "content": "The weather is fine.",
        "reasoning": None,
        "tool_calls": [],
        "finish_reason": "length",
        "reasoning_tokens": 0,
    }


def test_named_tool_choice_finishes_stop(tokenizer):
    """A named tool choice: the call streams, but the finish reason is "stop" (OpenAI's and
    vLLM's rule for named calls), streamed and in the message."""
    frontend = OpenAIFrontend.build(tokenizer, tool_call_parser="hermes")
    request = job({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    deltas = stream(tokenizer, frontend, request, TOOL_CALL)
    assert merged(deltas).tool_calls[0]["function"]["name"] == "get_weather"  # type: ignore[index]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].message is not None
    assert deltas[-1].message["finish_reason"] == "stop"
    assert deltas[-1].message["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_chat_logprobs_in_vllm_shape(tokenizer):
    frontend = OpenAIFrontend.build(tokenizer)
    request = job({"logprobs": True, "top_logprobs": 1})
    deltas = stream(tokenizer, frontend, request, "Hi there", logprobs=True)
    content = merged(deltas).logprobs["content"]  # type: ignore[index]
    tokens = [tokenizer.decode([t]) for t in tokenizer.encode("Hi there", add_special_tokens=False)]
    assert [c["token"] for c in content] == tokens
    assert [c["logprob"] for c in content] == [-0.25 * (k % 3) for k in range(len(tokens))]
    assert content[0]["bytes"] == list(tokens[0].encode())
    assert content[0]["top_logprobs"] == [{"token": tokens[0], "logprob": 0.0, "bytes": list(tokens[0].encode())}]


def test_completion_echo_and_logprobs(tokenizer):
    """Completions: echo puts the prompt's text first, logprobs' text offsets run on."""
    frontend = OpenAIFrontend.build(tokenizer)
    request = job({"echo": True, "logprobs": 0}, api="completion", echo_texts=["Say: "])
    rich = frontend.prepare(request)
    assert rich.params[0].prompt_logprobs == 0  # vLLM asks for them with echo
    processor = frontend.processor(rich, request, 0)
    prompt_lp: list[Any] = [None] + [
        {t: Logprob(logprob=-1.0, decoded_token=tokenizer.decode([t]))} for t in PROMPT[1:]
    ]
    texts, offsets = [], []
    for k, word in enumerate(["Hello", " world"]):
        (token,) = tokenizer.encode(word, add_special_tokens=False)
        output = VllmCompletionOutput(
            index=0,
            text=word,
            token_ids=[token],
            cumulative_logprob=None,
            logprobs=[{token: Logprob(logprob=-0.5, decoded_token=word)}],
            finish_reason="length" if k else None,
        )
        res = RequestOutput("r", None, PROMPT, prompt_lp if k == 0 else None, [output], finished=bool(k))
        (delta,) = processor.process(res)
        texts.append(delta.text)
        offsets.extend(delta.logprobs["text_offset"])  # type: ignore[index]
        if k == 0:
            assert delta.logprobs["token_logprobs"][:2] == [None, -1.0]  # type: ignore[index]
            assert len(delta.logprobs["tokens"]) == len(PROMPT) + 1  # type: ignore[index]
            # What vLLM's stream sends with the echo, and its non-streamed answer carries.
            assert delta.prompt_token_ids == PROMPT
            assert delta.prompt_logprobs is not None and delta.prompt_logprobs[0] is None
            assert delta.prompt_logprobs[1] == {
                str(PROMPT[1]): {"logprob": -1.0, "rank": None, "decoded_token": tokenizer.decode([PROMPT[1]])}
            }
        else:
            assert delta.prompt_token_ids is None and delta.prompt_logprobs is None
    assert texts == ["Say: Hello", " world"]
    assert delta.finish_reason == "length"
    assert offsets == sorted(offsets) and len(offsets) == len(PROMPT) + 2


def test_several_prompts_number_choices(tokenizer):
    frontend = OpenAIFrontend.build(tokenizer)
    request = JobRequest(
        prompt_token_ids=PROMPT,
        more_prompts=[PROMPT, PROMPT],
        sampling=SamplingSpec(n=2, max_tokens=4),
        output=OutputSpec(api="completion", body={"max_tokens": 4, "n": 2}),
    )
    rich = frontend.prepare(request)
    assert len(rich.params) == 3 and all(p.n == 2 for p in rich.params)
    processor = frontend.processor(rich, request, 2)
    outs = [
        VllmCompletionOutput(
            index=j, text="x", token_ids=[87], cumulative_logprob=None, logprobs=None, finish_reason=None
        )
        for j in range(2)
    ]
    assert [d.index for d in processor.process(RequestOutput("r", None, PROMPT, None, outs, False))] == [4, 5]


def test_vllm_refuses_what_vllm_serve_refuses(tokenizer):
    frontend = OpenAIFrontend.build(tokenizer, tool_call_parser="hermes")
    with pytest.raises(REQUEST_ERRORS, match="tool_choice"):
        frontend.prepare(job({"tool_choice": "required"}))
    with pytest.raises(REQUEST_ERRORS, match="top_logprobs"):
        frontend.prepare(job({"top_logprobs": 2}))
    # Without a tool parser, as vLLM's renderer: only tool_choice none.
    bare = OpenAIFrontend.build(tokenizer)
    with pytest.raises(REQUEST_ERRORS, match="requires --tool-call-parser"):
        bare.prepare(job({"tools": TOOLS, "tool_choice": "required"}))
    with pytest.raises(REQUEST_ERRORS, match="auto"):
        bare.prepare(job({"tools": TOOLS}))
    bare.prepare(job({"tools": TOOLS, "tool_choice": "none"}))


@pytest.fixture(scope="module")
def thinking_tokenizer(tmp_path_factory, tokenizer) -> Any:
    """SmolLM2 does not think: its vocabulary has no <think> / </think>, which vLLM's
    deepseek_r1 reasoning parser requires as single tokens. So the real tokenizer files,
    copied, with those two added as special tokens (what a reasoning model's tokenizer
    has); the token stream is then what such a model emits."""
    folder = tmp_path_factory.mktemp("thinking")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (MODEL / name).is_file():
            shutil.copy(MODEL / name, folder / name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.save_pretrained(str(folder))
    return get_tokenizer(str(folder))


def test_reasoning_split_streamed_and_final(thinking_tokenizer):
    tok = thinking_tokenizer
    frontend = OpenAIFrontend.build(tok, reasoning_parser="deepseek_r1")
    text = "<think>The user wants a city. Paris fits.</think>Paris is the answer."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    deltas = stream(tok, frontend, job({}), text)
    whole = merged(deltas)
    assert whole.reasoning == "The user wants a city. Paris fits."
    assert whole.text == "Paris is the answer."
    assert deltas[-1].finish_reason == "stop"
    message = deltas[-1].message
    assert message is not None
    assert message["reasoning"] == "The user wants a city. Paris fits."
    assert message["content"] == "Paris is the answer."
    assert message["reasoning_tokens"] > 0
    # include_reasoning=false: vLLM hides the reasoning (and logprobs), content stays.
    hidden = stream(tok, frontend, job({"include_reasoning": False, "logprobs": True}), text, logprobs=True)
    assert merged(hidden).reasoning is None and merged(hidden).logprobs is None
    assert merged(hidden).text == "Paris is the answer."
    assert hidden[-1].message is not None and hidden[-1].message["reasoning"] is None


def test_unknown_parser_names_fail_clearly():
    with pytest.raises(ParserConfigError, match="TOOL_CALL_PARSER='nope'.*no such tool-call parser"):
        check_parser_names("nope", "", True)
    with pytest.raises(ParserConfigError, match="REASONING_PARSER='nope'.*no such reasoning parser"):
        check_parser_names("", "nope", False)
    with pytest.raises(ParserConfigError, match="requires TOOL_CALL_PARSER"):
        check_parser_names("", "", True)
    check_parser_names("hermes", "deepseek_r1", True)


def test_settings_resolve_tool_choice():
    assert Settings(tool_call_parser="hermes").served_tool_call_parser == "hermes"
    assert Settings(tool_call_parser="hermes", enable_auto_tool_choice=False).served_tool_call_parser is None
    assert Settings().auto_tool_choice is False


def test_chat_template_override_wins_in_transformers(tmp_path):
    """CHAT_TEMPLATE's content, published as chat_template.jinja, is what the tokenizer the
    API rebuilds from the worker's files renders with."""
    files = {n: (MODEL / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = "FROM CONFIG"
    files["tokenizer_config.json"] = json.dumps(config).encode()
    files["chat_template.json"] = json.dumps({"chat_template": "FROM JSON"}).encode()
    out = with_chat_template(files, b"{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert "chat_template.json" not in out
    for name, content in out.items():
        (tmp_path / name).write_bytes(content)
    from transformers import AutoTokenizer  # as api/catalog.py loads the files

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
