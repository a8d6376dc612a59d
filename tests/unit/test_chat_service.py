"""How the API turns requests into jobs and job events into OpenAI chunks and SSE."""

from __future__ import annotations

import asyncio
import json

import pytest
from sse_starlette import ServerSentEvent

from api.chat import ChatService, SubmittedJob, resolve_max_tokens, sampling_from_request
from api.relay import StreamClosed, Subscription
from common.errors import ContextLengthError, InvalidRequestError
from common.jobs import ChoiceDelta, ChunkEvent
from common.schemas import ChatCompletionRequest, Usage
from common.settings import Settings


def req(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_max_tokens_defaults_to_the_room_left():
    assert resolve_max_tokens(req(), prompt_tokens=100, max_model_len=1000) == 900
    assert resolve_max_tokens(req(max_tokens=10), 100, 1000) == 10
    assert resolve_max_tokens(req(max_completion_tokens=7, max_tokens=10), 100, 1000) == 7


def test_context_overflow_is_a_400_naming_the_parameter():
    with pytest.raises(ContextLengthError) as exc:
        resolve_max_tokens(req(), 1000, 1000)
    assert exc.value.param == "messages" and exc.value.status_code == 400
    with pytest.raises(ContextLengthError) as exc:
        resolve_max_tokens(req(max_tokens=901), 100, 1000)
    assert exc.value.param == "max_tokens"


def test_sampling_spec_takes_what_was_given():
    spec = sampling_from_request(req(temperature=0, top_k=-1, seed=3, stop="x", n=2), max_tokens=5)
    assert (spec.temperature, spec.top_k, spec.seed, spec.stop, spec.n, spec.max_tokens) == (0, 0, 3, ["x"], 2, 5)
    assert spec.top_p == 1.0  # untouched default
    with pytest.raises(InvalidRequestError):
        sampling_from_request(req(min_tokens=9), max_tokens=5)


class StubRelay:
    def __init__(self):
        self.unsubscribed = []

    async def unsubscribe(self, sub):
        self.unsubscribed.append(sub.channel)


def make_job(n=1, events=()):
    sub = Subscription("ch", maxsize=64)
    for ev in events:
        sub._deliver(ev)
    return SubmittedJob(id="chatcmpl-1", model="m", created=1, n=n, subscription=sub)


def service(relay):
    return ChatService(Settings(), redis=None, relay=relay, catalog=None, queue=None)  # type: ignore[arg-type]


async def drain(gen):
    return [item async for item in gen]


EVENTS = [
    ChunkEvent(seq=0, kind="delta", choices=[ChoiceDelta(index=0, text="Hel", tokens=1)]),
    ChunkEvent(seq=1, kind="delta", choices=[ChoiceDelta(index=0, text="", tokens=1)]),
    ChunkEvent(seq=2, kind="delta", choices=[ChoiceDelta(index=0, text="lo", tokens=1, finish_reason="stop")]),
    ChunkEvent(seq=3, kind="done", usage=Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7)),
]


async def test_stream_wire_format():
    relay = StubRelay()
    out = await drain(service(relay).stream(make_job(events=EVENTS), req(stream=True, stream_options={"include_usage": True})))
    wire = "".join(ServerSentEvent(**item, sep="\n").encode().decode() for item in out)
    frames = [f for f in wire.split("\n\n") if f]
    datas = [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]
    assert frames[-1] == "data: [DONE]"
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(d["object"] == "chat.completion.chunk" and d["id"] == "chatcmpl-1" for d in datas)
    # The empty delta (a token with no text yet) is not sent; the rest carry their seq as `id:`.
    assert [d["choices"][0]["delta"] for d in datas[1:3]] == [{"content": "Hel"}, {"content": "lo"}]
    assert datas[2]["choices"][0]["finish_reason"] == "stop"
    assert frames[1].startswith("id: 0\n") and frames[2].startswith("id: 2\n")
    assert datas[3]["choices"] == [] and datas[3]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert relay.unsubscribed == ["ch"]


async def test_stream_without_include_usage_has_no_usage_chunk():
    out = await drain(service(StubRelay()).stream(make_job(events=EVENTS), req(stream=True)))
    datas = [json.loads(i["data"]) for i in out[:-1]]
    assert all(d["usage"] is None for d in datas) and out[-1]["data"] == "[DONE]"


async def test_error_after_start_goes_in_the_stream_then_done():
    events = [
        EVENTS[0],
        ChunkEvent(seq=1, kind="error", error={"error": {"message": "boom", "type": "server_error", "param": None, "code": "engine_error"}}),
    ]
    out = await drain(service(StubRelay()).stream(make_job(events=events), req(stream=True)))
    assert json.loads(out[-2]["data"])["error"]["message"] == "boom"
    assert out[-1]["data"] == "[DONE]"


async def test_collect_builds_a_chat_completion():
    completion = await service(StubRelay()).collect(make_job(events=EVENTS))
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "stop" and completion.usage.total_tokens == 7


async def test_collect_raises_the_workers_error():
    events = [ChunkEvent(seq=0, kind="error", error=InvalidRequestError("bad prompt").to_dict())]
    with pytest.raises(InvalidRequestError):
        await service(StubRelay()).collect(make_job(events=events))


async def test_gap_in_sequence_ends_the_stream_with_an_error():
    sub = Subscription("ch", maxsize=8)
    sub._deliver(EVENTS[0])
    sub._deliver(EVENTS[2])  # seq 1 lost
    assert (await sub.get()).seq == 0
    with pytest.raises(StreamClosed) as exc:
        await sub.get()
    assert exc.value.code == "stream_interrupted"


async def test_slow_consumer_is_cut_off_with_bounded_buffer():
    sub = Subscription("ch", maxsize=16)
    for i in range(100):
        sub._deliver(ChunkEvent(seq=i, kind="delta", choices=[ChoiceDelta(index=0, text="x")]))
    assert sub._queue.qsize() == 1
    with pytest.raises(StreamClosed) as exc:
        await asyncio.wait_for(sub.get(), 1)
    assert exc.value.code == "slow_consumer"
