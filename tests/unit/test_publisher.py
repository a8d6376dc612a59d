"""The worker's publisher: coalescing and gap-free sequence numbers."""

from __future__ import annotations

import asyncio

from common.jobs import ChoiceDelta, ChunkEvent
from common.schemas import Usage
from worker.publisher import ChunkPublisher, merge_deltas


def test_merge_deltas_concatenates_per_choice():
    merged = merge_deltas(
        [ChoiceDelta(index=0, text="a", tokens=1), ChoiceDelta(index=1, text="x", tokens=1)],
        [ChoiceDelta(index=0, text="b", tokens=2, finish_reason="length")],
    )
    assert merged == [
        ChoiceDelta(index=0, text="ab", tokens=3, finish_reason="length"),
        ChoiceDelta(index=1, text="x", tokens=1),
    ]


class RecordingPipeline:
    def __init__(self, sink):
        self.sink = sink
        self.batch = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def publish(self, channel, payload):
        self.batch.append((channel, payload))

    async def execute(self):
        self.sink.append(list(self.batch))


class RecordingRedis:
    def __init__(self):
        self.sent = []

    def pipeline(self, transaction=False):
        return RecordingPipeline(self.sent)


async def test_publisher_coalesces_a_backlog_and_numbers_without_gaps():
    redis = RecordingRedis()
    pub = ChunkPublisher(redis)  # type: ignore[arg-type]
    # A backlog built up while the publisher was busy: two jobs interleaved.
    for i in range(5):
        pub.delta("a", [ChoiceDelta(index=0, text=str(i), tokens=1)])
        pub.delta("b", [ChoiceDelta(index=0, text="b", tokens=1)])
    task = asyncio.create_task(pub.run())
    await pub.finish("a", "done", usage=Usage(prompt_tokens=1, completion_tokens=5, total_tokens=6))
    pub.delta("b", [ChoiceDelta(index=0, text="c", tokens=1)])
    await pub.finish("b", "done", usage=Usage(prompt_tokens=1, completion_tokens=6, total_tokens=7))
    task.cancel()
    events = {"a": [], "b": []}
    for batch in redis.sent:
        for channel, payload in batch:
            events[channel.rsplit(":", 1)[1]].append(ChunkEvent.decode(payload))
    a, b = events["a"], events["b"]
    assert [e.seq for e in a] == list(range(len(a))) and [e.seq for e in b] == list(range(len(b)))
    assert "".join(c.text for e in a for c in e.choices) == "01234" and a[-1].kind == "done"
    assert "".join(c.text for e in b for c in e.choices) == "bbbbbc" and b[-1].kind == "done"
    # The backlog went out as one message per job, not one per token.
    assert len(a) == 2
