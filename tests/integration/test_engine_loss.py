"""A worker whose real vLLM engine dies mid-answer (its engine core process killed):
only the real engine can show that vLLM reports itself dead and that the worker then
gives its job back at once, unregisters and exits 3 for its supervisor to restart it,
instead of staying registered and failing every job sent to it. The job then continues
on another worker from the tokens already sent (a fake-engine one here: starting a
second real engine costs a minute and shows nothing new)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import httpx
import openai
import pytest
import redis as redis_lib

from common.settings import get_settings
from tests.integration.sse import read_sse

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = get_settings().model_name
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture(scope="module")
def estack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine-loss-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={"WORKER_SLOTS": "8", "FILES_DIR": str(logs / "files")},
    )
    try:
        s.start_redis()
        s.start_worker("we1")
        s.start_api()
        s.wait_ready(MODEL, timeout=600)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def live(s: Stack) -> list[str]:
    r = redis_lib.Redis.from_url(s.redis_url)
    return [w.decode() for w in r.zrangebyscore("llmq:workers", time.time() - 15, "+inf")]


def field(s: Stack, job_id: str, name: str) -> str | None:
    value = redis_lib.Redis.from_url(s.redis_url).hget(f"llmq:job:{job_id}", name)
    return value.decode() if value is not None else None


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


async def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def test_a_worker_whose_engine_dies_gives_its_jobs_back_and_exits(estack):
    client = openai.OpenAI(base_url=estack.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    job = client.chat.completions.create(
        model=MODEL,
        messages=STORY,
        temperature=0,
        max_tokens=300,
        extra_body={"background": True, "ignore_eos": True},
    )
    async with httpx.AsyncClient(base_url=estack.api_url, timeout=300) as h:
        follower = asyncio.create_task(read_sse(h, "GET", f"/v1/chat/completions/{job.id}/stream"))
        await wait_for(lambda: field(estack, job.id, "status") == "in_progress", 60)
        await read_sse(h, "GET", f"/v1/chat/completions/{job.id}/stream", stop_after_content=5)
        holder = field(estack, job.id, "worker")
        assert holder is not None
        pid = int(holder.split("/")[1].split("-")[0])
        proc = next(p for p in estack.procs if p.popen.pid == pid)
        proc.expected_exit = True  # type: ignore[attr-defined]
        engines = children_of(pid)
        assert engines, "the worker has no engine process"
        for child in engines:
            os.kill(child, signal.SIGKILL)
        code = await asyncio.to_thread(proc.popen.wait, 60)
        assert code == 3
        assert holder not in live(estack)
        # Given back at once, not left to a lapsing lease: queued again, its message sent by
        # the API's reaper (the dying worker must not take it again itself).
        assert field(estack, job.id, "status") == "queued" and field(estack, job.id, "attempt") == "1"
        estack.start_worker("wfake", {"ENGINE": "fake"})
        followed = await asyncio.wait_for(follower, 300)
    final = client.chat.completions.retrieve(job.id)
    assert final.model_extra["status"] == "completed" and final.model_extra["attempt"] == 2
    assert field(estack, job.id, "worker") != holder
    assert followed.done and not followed.errors and final.choices[0].message.content == followed.text
    log = redis_lib.Redis.from_url(estack.redis_url).lrange(f"llmq:events:{job.id}", 0, -1)
    tokens = sum(len(c.get("token_ids", [])) for e in map(json.loads, log) for c in e.get("choices", []))
    assert tokens == final.usage.completion_tokens == 300
    # The text the client followed is the real engine's first part, then the rest.
    assert followed.chunks[1].get("attempt", 1) == 1 and followed.chunks[-2].get("attempt") == 2
