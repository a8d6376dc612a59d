"""The fake engine's rich answers (ENGINE=fake): shaped like the real engine's, so the
API's rendering, resume and retry paths can run on it."""

from __future__ import annotations

import json

from common.jobs import ChoiceDelta, JobRequest, OutputSpec, SamplingSpec
from common.settings import Settings
from worker.fake_engine import FakeEngine, expected_text


async def run(
    request: JobRequest, job_id: str = "chatcmpl-1"
) -> tuple[list[list[ChoiceDelta]], dict[int, ChoiceDelta]]:
    engine = FakeEngine(Settings(engine="fake"))
    steps = [deltas async for deltas in engine.generate(job_id, request)]
    whole: dict[int, ChoiceDelta] = {}
    for deltas in steps:
        for d in deltas:
            whole.setdefault(d.index, ChoiceDelta(index=d.index)).extend(d)
    return steps, whole


def rich(body: dict, api: str = "chat", max_tokens: int = 20, **kw) -> JobRequest:
    return JobRequest(
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingSpec(max_tokens=max_tokens),
        output=OutputSpec(api=api, body=body, **kw),  # type: ignore[arg-type]
    )


async def test_named_tool_choice_streams_a_call():
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    steps, whole = await run(rich({"tools": [], "tool_choice": tool_choice}))
    first = steps[0][0].tool_calls
    assert first is not None and first[0]["id"].startswith("chatcmpl-tool-") and len(first[0]["id"]) == 30
    assert first[0]["function"] == {"name": "get_weather", "arguments": ""}
    call = whole[0].tool_calls[0]  # type: ignore[index]
    assert json.loads(call["function"]["arguments"]) == {"text": expected_text(3, 20)}
    assert whole[0].finish_reason == "stop" and whole[0].text == ""
    assert steps[-1][0].message == {
        "content": "",
        "reasoning": None,
        "tool_calls": [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": call["function"]["arguments"]},
            }
        ],
        "finish_reason": "stop",
    }
    # Deterministic: a retried attempt streams the same call id.
    _, again = await run(rich({"tools": [], "tool_choice": tool_choice}))
    assert again[0].tool_calls[0]["id"] == call["id"]  # type: ignore[index]


async def test_text_logprobs_and_message():
    steps, whole = await run(rich({"logprobs": True, "top_logprobs": 1}))
    assert whole[0].text == expected_text(3, 20) and whole[0].finish_reason == "length"
    content = whole[0].logprobs["content"]  # type: ignore[index]
    assert [c["token"] for c in content] == [f" t{p}" for p in range(3, 23)]
    assert steps[-1][0].message == {
        "content": expected_text(3, 20),
        "reasoning": None,
        "tool_calls": [],
        "finish_reason": "length",
    }


async def test_completion_echo_and_offsets():
    _, whole = await run(rich({"echo": True, "logprobs": 0}, api="completion", echo_texts=["Hi"]))
    assert whole[0].text == "Hi" + expected_text(3, 20)
    lp = whole[0].logprobs
    assert lp is not None and lp["text_offset"][:2] == [2, 2 + len(" t3")]
    assert whole[0].message is None
