"""Rich jobs (tool calls, logprobs: issue 10) keep the queue's guarantees, on real Redis,
Celery workers and API processes with the fake engine (its tool-call and logprob deltas
have the real engine's shapes; vLLM's own parsing is tested in tests/unit/
test_openai_output.py and against `vllm serve` in test_parity.py):

- a resumed stream replays tool-call deltas exactly as the live stream sent them;
- a job whose worker is lost starts over on another worker (parser and grammar state
  cannot continue from text), and a stream that already showed part of the call ends
  with a `worker_lost` error instead of mixing two attempts' arguments; the job's result
  is one whole call.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import httpx
import pytest
import redis as redis_lib

from tests.integration.sse import SSEStream, read_sse

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"text": {}}}},
    }
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    logs = tmp_path_factory.mktemp("rich-jobs-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.02",
            "TOOL_CALL_PARSER": "hermes",
            "HEARTBEAT_SECONDS": "0.5",
            "WORKER_TTL_SECONDS": "3",
            "LEASE_SECONDS": "2",
            "REAPER_INTERVAL_SECONDS": "0.5",
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_worker("w1")
        s.start_worker("w2")
        s.start_api()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather?"}],
        "max_tokens": max_tokens,
        "tools": TOOLS,
        "tool_choice": NAMED,
        "stream": True,
        **extra,
    }


def tool_deltas(stream: SSEStream) -> list[dict[str, Any]]:
    return [tc for chunk in stream.chunks for c in chunk.get("choices", []) for tc in c["delta"].get("tool_calls", [])]


def arguments(deltas: list[dict[str, Any]]) -> str:
    return "".join((d.get("function") or {}).get("arguments") or "" for d in deltas)


def record(s: Stack, job_id: str) -> dict[str, str]:
    raw = redis_lib.Redis.from_url(s.redis_url).hgetall(f"llmq:job:{job_id}")
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_resumed_tool_call_stream_replays_exactly(rich):
    async with httpx.AsyncClient(base_url=rich.api_url, timeout=60) as h:
        live = await read_sse(h, "POST", "/v1/chat/completions", json_body=body(64, background=True, logprobs=True))
        job_id = live.chunks[0]["id"]
        calls = tool_deltas(live)
        # OpenAI's order: the call's index, id, type and name first, then argument fragments.
        assert calls[0]["index"] == 0 and calls[0]["id"].startswith("chatcmpl-tool-")
        assert calls[0]["function"]["name"] == "get_weather"
        assert all("id" not in d and d["function"].get("arguments") for d in calls[1:])
        assert json.loads(arguments(calls)) == {"text": json.loads(arguments(calls))["text"]}
        assert live.finish_reasons == ["stop"]  # a named call ends "stop", as OpenAI's and vLLM's
        assert not live.id_lines  # data: lines only on create

        whole = await read_sse(h, "GET", f"/v1/chat/completions/{job_id}/stream")
        # The replay: the same chunks (the create stream's role chunk aside), with id: lines.
        # The replay from the start: the same chunks, role chunk included, each event's
        # with its id: line.
        assert live.chunks == whole.chunks
        assert whole.id_lines == [str(c["seq"]) for c in whole.chunks if "seq" in c]

        cursor = live.ids[2]
        rest = await read_sse(h, "GET", f"/v1/chat/completions/{job_id}/stream?starting_after={cursor}")
        assert rest.chunks == [c for c in whole.chunks if c.get("seq", -1) > cursor]

        done = (await h.get(f"/v1/chat/completions/{job_id}")).json()
        (call,) = done["choices"][0]["message"]["tool_calls"]
        assert call["id"] == calls[0]["id"] and call["function"]["arguments"] == arguments(calls)
        # The result's logprobs are the stream's, joined.
        streamed_lp = [
            e for chunk in whole.chunks for c in chunk["choices"] for e in (c["logprobs"] or {}).get("content", [])
        ]
        assert done["choices"][0]["logprobs"]["content"] == streamed_lp


async def test_a_lost_workers_tool_call_starts_over_and_its_stream_says_so(rich):
    """SIGKILL the worker holding a streaming tool call mid-arguments: the job starts over
    on the other worker (attempt 2). The client that had part of the arguments gets a
    `worker_lost` error and [DONE], never fragments of the second attempt after those of
    the first; the finished job holds one whole call. (With the cut at an attempt change
    limited to n > 1, as before issue 10, this failed: no error, the stream went on with
    the second attempt's deltas after the first's.)"""
    async with httpx.AsyncClient(base_url=rich.api_url, timeout=120) as h:
        reader = asyncio.create_task(
            read_sse(h, "POST", "/v1/chat/completions", json_body=body(8 * 150, background=True))
        )

        def holder() -> str | None:
            for key in redis_lib.Redis.from_url(rich.redis_url).scan_iter("llmq:job:chatcmpl-*"):
                rec = record(rich, key.decode().split(":", 2)[2])
                if rec.get("status") == "in_progress" and int(rec.get("attempt", "0")) == 1:
                    log_len = redis_lib.Redis.from_url(rich.redis_url).llen(f"llmq:events:{rec['id']}")
                    if log_len >= 3:
                        return rec["id"] + " " + rec["worker"]
            return None

        deadline = time.monotonic() + 60
        found = None
        while found is None and time.monotonic() < deadline:
            found = holder()
            await asyncio.sleep(0.05)
        assert found is not None, "the job never ran"
        job_id, worker = found.split(" ")
        pid = int(worker.split("/")[1].split("-")[0])
        os.killpg(pid, signal.SIGKILL)
        for p in rich.procs:
            if p.popen.pid == pid:
                p.expected_exit = True  # type: ignore[attr-defined]
        stream = await asyncio.wait_for(reader, 120)

    assert stream.done
    assert [e["code"] for e in stream.errors] == ["worker_lost"]
    calls = tool_deltas(stream)
    assert sum(1 for d in calls if "id" in d) == 1  # one call's start, never a second one
    assert len({c.get("attempt", 1) for c in stream.chunks if "choices" in c}) == 1

    def ended() -> dict[str, str] | None:
        rec = record(rich, job_id)
        return rec if rec.get("status") in ("completed", "failed") else None

    deadline = time.monotonic() + 60
    final = ended()
    while final is None and time.monotonic() < deadline:
        time.sleep(0.1)
        final = ended()
    assert final is not None and final["status"] == "completed" and final["attempt"] == "2"
    result = json.loads(final["result"])
    (call,) = result["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["text"]  # one whole call, parseable

    # Replayed from the start afterwards: the attempt that finished, whole, and nothing of
    # the one that was lost (before: the first attempt's fragments, then `worker_lost`).
    async with httpx.AsyncClient(base_url=rich.api_url, timeout=60) as h:
        replay = await read_sse(h, "GET", f"/v1/chat/completions/{job_id}/stream")
    assert replay.done and not replay.errors
    calls = tool_deltas(replay)
    assert [d["id"] for d in calls if "id" in d] == [call["id"]]
    assert arguments(calls) == call["function"]["arguments"]
    assert {c.get("attempt", 1) for c in replay.chunks if c.get("choices") and "seq" in c} == {2}
    rich.start_worker("w1")
