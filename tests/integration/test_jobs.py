"""Jobs: background requests, reading a job's stream from any point (as often as wanted,
by several readers at once), and cancellation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from celery import Celery

from common.jobs import JobRecord, JobRequest, SamplingSpec, new_job_id
from tests.integration.sse import read_sse

pytestmark = pytest.mark.integration

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture
async def ahttp(stack, api_key):
    auth = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=300, headers=auth) as h:
        yield h


def background(client, model, **kw):
    body = {"background": True, "ignore_eos": kw.pop("ignore_eos", True)}
    return client.chat.completions.create(model=model, messages=kw.pop("messages", STORY), extra_body=body, **kw)


def wait_status(client, job_id, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.chat.completions.retrieve(job_id)
        if job.model_extra["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} never reached {statuses}")


def test_background_job_answers_at_once_and_completes(client, model):
    t0 = time.monotonic()
    job = background(client, model, messages=FRANCE, temperature=0, max_tokens=30, ignore_eos=False)
    assert time.monotonic() - t0 < 2
    assert job.id.startswith("chatcmpl-") and job.model_extra["status"] in ("queued", "in_progress")
    assert job.choices == [] and job.usage is None
    done = wait_status(client, job.id, {"completed"})
    assert "Paris" in done.choices[0].message.content and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == 8 and done.model_extra["attempt"] == 1
    assert done.model_extra["finished_at"] >= done.model_extra["started_at"] >= done.created


async def test_two_readers_a_cut_and_a_resume_see_the_same_text(client, model, ahttp):
    job = background(client, model, temperature=0, max_tokens=48)
    url = f"/v1/chat/completions/{job.id}/stream"
    whole_task = asyncio.create_task(read_sse(ahttp, "GET", url))
    first = await read_sse(ahttp, "GET", url, stop_after_content=6)
    assert not first.done and first.last_id is not None
    # Reconnect where the cut left off, by header and by query.
    rest = await read_sse(ahttp, "GET", url, headers={"Last-Event-ID": first.last_id})
    whole = await whole_task
    assert whole.done and rest.done
    assert first.text + rest.text == whole.text
    assert min(rest.ids) == int(first.last_id) + 1 and whole.ids == sorted(set(whole.ids))
    # Resumed streams carry no second role chunk.
    assert "role" not in rest.chunks[0]["choices"][0]["delta"]
    by_query = await read_sse(ahttp, "GET", f"{url}?starting_after={first.ids[2]}")
    assert whole.text.endswith(by_query.text) and by_query.ids[0] == first.ids[2] + 1
    # A reader arriving after the end replays everything.
    late = await read_sse(ahttp, "GET", url)
    assert late.text == whole.text and late.done
    stored = client.chat.completions.retrieve(job.id)
    assert stored.choices[0].message.content == whole.text and stored.usage.completion_tokens == 48


async def test_streaming_background_request_is_not_cancelled_by_leaving(client, model, ahttp, stack):
    body = {"model": model, "messages": STORY, "max_tokens": 24, "stream": True, "background": True, "ignore_eos": True}
    first = await read_sse(ahttp, "POST", "/v1/chat/completions", json_body=body, stop_after_content=2)
    job_id = first.chunks[0]["id"]
    done = wait_status(client, job_id, {"completed", "cancelled"})
    assert done.model_extra["status"] == "completed" and done.usage.completion_tokens == 24


async def test_cancel_a_running_job(client, model, ahttp, redis):
    job = background(client, model, max_tokens=3000)
    url = f"/v1/chat/completions/{job.id}/stream"
    follower = asyncio.create_task(read_sse(ahttp, "GET", url))
    first = await read_sse(ahttp, "GET", url, stop_after_content=3)
    assert first.chunks
    t0 = time.monotonic()
    resp = await ahttp.post(f"/v1/chat/completions/{job.id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert time.monotonic() - t0 < 2.0
    followed = await asyncio.wait_for(follower, 10)
    assert followed.done and followed.finish_reasons == ["cancelled"]
    record = client.chat.completions.retrieve(job.id)
    assert record.choices[0].finish_reason == "cancelled" and record.choices[0].message.content
    assert record.usage.completion_tokens < 3000
    # It no longer holds a lease (nothing for the reaper to take back).
    assert redis.zscore("llmq:leases", job.id) is None
    # Cancelling again is harmless; cancelling a finished or unknown job is refused.
    assert (await ahttp.post(f"/v1/chat/completions/{job.id}/cancel")).json()["status"] == "cancelled"
    done = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=2)
    resp = await ahttp.post(f"/v1/chat/completions/{done.id}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_not_cancellable"
    resp = await ahttp.post("/v1/chat/completions/chatcmpl-nope/cancel")
    assert resp.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve("chatcmpl-nope")


async def test_a_cancelled_queued_job_never_starts(stack, model, tokenizer, redis, ahttp, flower, api_key):
    """A job cancelled while still queued is skipped when a worker takes its message."""
    from redis.asyncio import Redis

    from api.auth import key_id
    from common.jobstore import JobStore

    text = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    record = JobRecord(
        id=new_job_id(),
        model=model,
        owner=key_id(api_key),  # the caller's, as if it had created it
        request=JobRequest(prompt_token_ids=ids, sampling=SamplingSpec(max_tokens=5)),
    )
    async with Redis.from_url(stack.redis_url) as r:
        await JobStore(r, 3600).create(record)
    resp = await ahttp.post(f"/v1/chat/completions/{record.id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    # Its message now reaches the worker, which must not run it.
    producer = Celery(broker=stack.redis_url)
    producer.send_task("chat.completion", args=[record.id], task_id=record.id, queue=f"chat.{model}")
    deadline = time.monotonic() + 30
    info = {}
    while time.monotonic() < deadline:
        resp = flower.get(f"/api/task/info/{record.id}")
        info = resp.json() if resp.status_code == 200 else {}
        if info.get("state") == "SUCCESS":
            break
        await asyncio.sleep(0.3)
    producer.close()
    assert info.get("state") == "SUCCESS" and "started=false" in info["result"]
    rec = {k.decode(): v.decode() for k, v in redis.hgetall(f"llmq:job:{record.id}").items()}
    assert rec["status"] == "cancelled" and "started" not in rec and rec["attempt"] == "0"
    replay = await read_sse(ahttp, "GET", f"/v1/chat/completions/{record.id}/stream")
    assert replay.finish_reasons == ["cancelled"] and replay.done and replay.text == ""


async def test_leaving_a_non_streaming_request_cancels_it(stack, model, redis, api_key):
    body = {"model": model, "messages": STORY, "max_tokens": 3000, "ignore_eos": True}
    auth = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=2, headers=auth) as short:
        with pytest.raises(httpx.ReadTimeout):
            await short.post("/v1/chat/completions", json=body)
    # The job that request made is the newest one; it must end cancelled.
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        newest = max((redis.hgetall(k) for k in redis.scan_iter("llmq:job:*")), key=lambda h: float(h[b"created"]))
        status = newest[b"status"].decode()
        if status == "cancelled":
            break
        await asyncio.sleep(0.2)
    assert status == "cancelled"


async def test_readers_drop_repeats_and_fill_gaps_from_the_log(stack, model, tokenizer, ahttp, api_key):
    """The test plays the worker on a real Redis: a repeated event on the channel is
    delivered once, and an event that never reached the channel (pub/sub loses messages)
    is filled in from the replay log, in order."""
    from redis.asyncio import Redis

    from api.auth import key_id
    from common import keys
    from common.jobs import ChoiceDelta, ChunkEvent
    from common.jobstore import JobStore, new_claim_token
    from common.schemas import Usage

    ids = tokenizer.encode("hi", add_special_tokens=False)
    record = JobRecord(
        id=new_job_id(),
        model=model,
        owner=key_id(api_key),
        request=JobRequest(prompt_token_ids=ids, sampling=SamplingSpec(max_tokens=9)),
    )

    def delta(seq: int, text: str) -> ChunkEvent:
        return ChunkEvent(seq=seq, kind="delta", choices=[ChoiceDelta(index=0, text=text, token_ids=[seq])])

    async with Redis.from_url(stack.redis_url) as r:
        store = JobStore(r, 3600)
        await store.create(record)
        assert await store.claim(record.id, record.model, "the-test", new_claim_token(), lease_seconds=3600) == 1
        await store.append(record.id, 1, 0, [e.encode() for e in (delta(0, "a"), delta(1, "b"), delta(2, "c"))])
        seen: list[tuple[str | None, str]] = []

        async def read() -> None:
            async with ahttp.stream("GET", f"/v1/chat/completions/{record.id}/stream") as resp:
                event_id, data = None, None
                async for line in resp.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data is not None:
                        seen.append((event_id, data))
                        event_id, data = None, None
                        if seen[-1][1] == "[DONE]":
                            return

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + 10
        while sum(1 for i, _ in seen if i is not None) < 3:  # caught up from the log, now live
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await r.publish(keys.job_channel(record.id), delta(1, "b").encode())  # a repeat
        await r.rpush(keys.job_log(record.id), delta(3, "d").encode())  # logged, never published
        await store.append(record.id, 1, 4, [delta(4, "e").encode()])
        done = ChunkEvent(seq=5, kind="done", usage=Usage(prompt_tokens=1, completion_tokens=5, total_tokens=6))
        await store.append(record.id, 1, 5, [done.encode()])
        await asyncio.wait_for(reader, 15)
    ids_seen = [int(i) for i, _ in seen if i is not None]
    assert ids_seen == [0, 1, 2, 3, 4]
    text = "".join(
        json.loads(d)["choices"][0]["delta"].get("content", "")
        for _, d in seen
        if d != "[DONE]" and json.loads(d)["choices"]
    )
    assert text == "abcde" and seen[-1][1] == "[DONE]"
