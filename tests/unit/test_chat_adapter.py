"""How the API turns requests into jobs and job events into OpenAI chunks and SSE."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError
from sse_starlette import ServerSentEvent

from api.endpoints.chat import ChatAdapter, JobView, resolve_max_tokens, sampling_from_request
from api.relay import StreamClosed, Subscription
from api.routes.chat import written_together
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
    spec = sampling_from_request(req(temperature=0.5, top_k=-1, seed=3, stop="x", n=2), max_tokens=5)
    assert (spec.temperature, spec.top_k, spec.seed, spec.stop, spec.n, spec.max_tokens) == (0.5, 0, 3, ["x"], 2, 5)
    with pytest.raises(ValidationError):  # vLLM: "n must be 1 when using greedy sampling"
        req(temperature=0, n=2)
    assert spec.top_p is None  # not given: the worker applies the model's default, then OpenAI's
    with pytest.raises(InvalidRequestError):
        sampling_from_request(req(min_tokens=9), max_tokens=5)


class ScriptedPipeline:
    """The job pipeline's reading side, with the job's events from a list instead of Redis."""

    def __init__(self, events):
        self.events = events
        self.cancelled = []

    async def follow(self, job_id, after=-1, subscription=None):
        for event in self.events:
            if event.seq > after:
                yield event
                if event.kind != "delta":
                    return

    async def follow_batches(self, job_id, after=-1, subscription=None):
        """One event a batch, or all of them in one (`together`: a reader that fell behind)."""
        if getattr(self, "together", False):
            yield [e async for e in self.follow(job_id, after, subscription)]
            return
        async for event in self.follow(job_id, after, subscription):
            yield [event]

    async def cancel(self, job_id, quiet=False, source="client"):
        self.cancelled.append(job_id)
        return "in_progress"


class ScriptedService(ChatAdapter):
    def __init__(self, events):
        self.scripted = ScriptedPipeline(events)
        super().__init__(Settings(), pipeline=self.scripted, catalog=None)  # type: ignore[arg-type]

    @property
    def cancelled(self):
        return self.scripted.cancelled


def view(n=1, include_usage=False, kind="chat", continuable=None):
    return JobView(
        id="chatcmpl-1" if kind == "chat" else "cmpl-1",
        model="m",
        created=1,
        n=n,
        include_usage=include_usage,
        background=False,
        kind=kind,
        continuable=n == 1 if continuable is None else continuable,
    )


async def drain(gen):
    return [item async for item in gen]


EVENTS = [
    ChunkEvent(seq=0, kind="delta", choices=[ChoiceDelta(index=0, text="Hel", token_ids=[1])]),
    ChunkEvent(seq=1, kind="delta", choices=[ChoiceDelta(index=0, text="", token_ids=[1])]),
    ChunkEvent(seq=2, kind="delta", choices=[ChoiceDelta(index=0, text="lo", token_ids=[1], finish_reason="stop")]),
    ChunkEvent(seq=3, kind="done", usage=Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7)),
]


async def test_stream_wire_format():
    out = await drain(ScriptedService(EVENTS).stream(view(include_usage=True)))
    wire = "".join(ServerSentEvent(**item, sep="\n").encode().decode() for item in out)
    frames = [f for f in wire.split("\n\n") if f]
    datas = [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]
    assert frames[-1] == "data: [DONE]"
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(d["object"] == "chat.completion.chunk" and d["id"] == "chatcmpl-1" for d in datas)
    # The empty delta (a token with no text yet) is not sent; the rest carry their seq in
    # the JSON, and the wire has `data:` lines only (as OpenAI and vLLM send them).
    assert [d["choices"][0]["delta"] for d in datas[1:3]] == [{"content": "Hel"}, {"content": "lo"}]
    assert datas[2]["choices"][0]["finish_reason"] == "stop"
    assert all(line.startswith("data: ") for f in frames for line in f.split("\n"))
    assert "seq" not in datas[0] and [d["seq"] for d in datas[1:]] == [0, 2, 3]
    assert datas[3]["choices"] == [] and datas[3]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
    }
    assert all("attempt" not in d for d in datas)


async def test_events_ready_together_and_the_end_go_out_in_one_write_with_the_same_bytes():
    """A reader that fell behind writes what was ready in one send, and the last chunks go
    with [DONE]: fewer writes, the same bytes on the wire as one event a write."""
    one_by_one = ScriptedService(EVENTS)
    together = ScriptedService(EVENTS)
    together.scripted.together = True
    batches = [b async for b in one_by_one.stream_batches(view(include_usage=True))]
    # The role chunk at once; then a write per delta; the usage chunk goes with [DONE].
    assert [len(b) for b in batches] == [1, 1, 1, 2]
    assert batches[-1][-1] == {"data": "[DONE]"}
    batches_together = [b async for b in together.stream_batches(view(include_usage=True))]
    assert [len(b) for b in batches_together] == [1, 4]
    writes = [w async for w in written_together(together.stream_batches(view(include_usage=True)))]
    events = [e for b in batches for e in b]
    assert len(writes) == 2
    assert b"".join(writes) == b"".join(ServerSentEvent(**e, sep="\n").encode() for e in events)


async def test_resumed_stream_starts_after_the_given_event_without_role_chunk():
    out = await drain(ScriptedService(EVENTS).stream(view(), after=0, with_ids=True))
    datas = [json.loads(i["data"]) for i in out[:-1]]
    assert [d["choices"][0]["delta"] for d in datas] == [{"content": "lo"}]
    assert out[0]["id"] == "2" and datas[0]["seq"] == 2 and out[-1]["data"] == "[DONE]"


async def test_stream_without_include_usage_has_no_usage_chunk():
    out = await drain(ScriptedService(EVENTS).stream(view()))
    datas = [json.loads(i["data"]) for i in out[:-1]]
    assert all(d["usage"] is None for d in datas) and out[-1]["data"] == "[DONE]"


async def test_error_after_start_goes_in_the_stream_then_done():
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": "engine_error"}}
    events = [EVENTS[0], ChunkEvent(seq=1, kind="error", error=error)]
    out = await drain(ScriptedService(events).stream(view()))
    assert json.loads(out[-2]["data"])["error"]["message"] == "boom"
    assert out[-1]["data"] == "[DONE]"


async def test_new_attempt_is_marked_on_its_chunks():
    events = [
        EVENTS[0],
        ChunkEvent(seq=1, kind="delta", attempt=2, choices=[ChoiceDelta(index=0, text="lo", token_ids=[5])]),
        ChunkEvent(seq=2, kind="done", attempt=2, usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
    ]
    out = await drain(ScriptedService(events).stream(view()))
    datas = [json.loads(i["data"]) for i in out[:-1]]
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in datas[1:]) == "Hello"
    assert datas[2]["attempt"] == 2


async def test_restarted_multi_choice_job_ends_the_stream_with_an_error():
    events = [
        ChunkEvent(seq=0, kind="delta", choices=[ChoiceDelta(index=0, text="a"), ChoiceDelta(index=1, text="b")]),
        ChunkEvent(seq=1, kind="delta", attempt=2, choices=[ChoiceDelta(index=0, text="c")]),
    ]
    out = await drain(ScriptedService(events).stream(view(n=2)))
    assert json.loads(out[-2]["data"])["error"]["code"] == "worker_lost" and out[-1]["data"] == "[DONE]"


async def test_cancelled_job_ends_with_finish_reason_cancelled():
    events = [
        ChunkEvent(
            seq=0,
            kind="done",
            choices=[ChoiceDelta(index=0, finish_reason="cancelled")],
            usage=Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1),
        ),
    ]
    out = await drain(ScriptedService(events).stream(view()))
    assert json.loads(out[1]["data"])["choices"][0]["finish_reason"] == "cancelled"


async def test_leaving_an_ordinary_stream_cancels_the_job_but_not_a_background_one():
    for cancel_on_disconnect, expected in ((True, ["chatcmpl-1"]), (False, [])):
        service = ScriptedService(EVENTS)
        gen = service.stream(view(), cancel_on_disconnect=cancel_on_disconnect)
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()
        assert service.cancelled == expected


async def test_slow_consumer_is_cut_off_with_bounded_buffer():
    sub = Subscription("ch", maxsize=16)
    for i in range(100):
        sub._deliver(ChunkEvent(seq=i, kind="delta", choices=[ChoiceDelta(index=0, text="x")]))
    assert sub._queue.qsize() == 1
    with pytest.raises(StreamClosed) as exc:
        await asyncio.wait_for(sub.get(), 1)
    assert exc.value.code == "slow_consumer"


async def test_a_short_prompt_is_tokenized_on_the_loop_and_a_long_one_in_a_thread():
    """A thread hand-off per prompt cost more than tokenizing a short one (issue 12); a long
    one still goes to a thread so that it does not hold up the event loop."""
    import threading

    from api.endpoints.chat import INLINE_TOKENIZE_CHARS, tokenize_off_loop_if_long

    here = threading.current_thread()
    short = await tokenize_off_loop_if_long(INLINE_TOKENIZE_CHARS, threading.current_thread)
    long = await tokenize_off_loop_if_long(INLINE_TOKENIZE_CHARS + 1, threading.current_thread)
    assert short is here
    assert long is not here


async def test_the_queue_wait_comes_with_the_workers_last_event_not_from_the_record():
    """A worker's last event carries the record's `started`: the stream observes the queue
    wait (started - created) from it instead of reading the record, a round trip a job
    (issue 12). The scripted pipeline has no Redis: a read would fail."""
    import time

    from api.metrics import QUEUE_WAIT, RequestTimer

    def observed() -> tuple[float, float]:
        samples = {s.name: s.value for m in QUEUE_WAIT.collect() for s in m.samples if s.labels.get("model") == "m"}
        return samples.get("llmq_queue_wait_seconds_count", 0.0), samples.get("llmq_queue_wait_seconds_sum", 0.0)

    job = view()
    job.created_at = 1000.0
    events = [*EVENTS[:3], EVENTS[3].model_copy(update={"started": 1000.25})]
    before = observed()
    out = await drain(ScriptedService(events).stream_batches(job, timer=RequestTimer("m", time.perf_counter())))
    assert out[-1][-1] == {"data": "[DONE]"}
    after = observed()
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == pytest.approx(0.25)
