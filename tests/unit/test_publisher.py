"""The worker's publisher: coalescing and gap-free sequence numbers."""

from __future__ import annotations

import asyncio

from common.jobs import ChoiceDelta, ChunkEvent
from common.schemas import Usage
from worker.publisher import ChunkPublisher, merge_deltas


def test_merge_deltas_concatenates_per_choice():
    merged = merge_deltas(
        [ChoiceDelta(index=0, text="a", token_ids=[1]), ChoiceDelta(index=1, text="x", token_ids=[9])],
        [ChoiceDelta(index=0, text="b", token_ids=[2, 3], finish_reason="length")],
    )
    assert merged == [
        ChoiceDelta(index=0, text="ab", token_ids=[1, 2, 3], finish_reason="length"),
        ChoiceDelta(index=1, text="x", token_ids=[9]),
    ]


async def test_coalescing_grows_copies_and_leaves_the_engine_deltas_as_they_were():
    """The publisher merges a backlog in place, into copies of its own: the deltas the
    engine handed over (and their token ids and logprobs lists) stay as they were."""
    store = FakeStore()
    pub = ChunkPublisher(store, "w1")  # type: ignore[arg-type]
    steps = [
        [ChoiceDelta(index=0, text=str(i), token_ids=[i], logprobs={"content": [{"token": str(i)}]})] for i in range(4)
    ]
    before = [[c.model_copy(deep=True) for c in step] for step in steps]
    for step in steps:
        pub.delta("a", 1, step)
    pub.delta("a", 1, [ChoiceDelta(index=1, text="z", token_ids=[7])])
    task = asyncio.create_task(pub.run())
    assert await pub.finish("a", 1, "done", fields={"status": "completed"})
    task.cancel()
    assert steps == before
    merged = store.logs["a"][0].choices
    assert [c.index for c in merged] == [0, 1]
    assert merged[0].text == "0123" and merged[0].token_ids == [0, 1, 2, 3]
    assert [t["token"] for t in merged[0].logprobs["content"]] == ["0", "1", "2", "3"]


class RecordingPipeline:
    def __init__(self, store):
        self.store = store
        self.answers = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def execute(self):
        return self.answers


class FakeStore:
    """Records what the publisher appends, as JobStore's scripts would, per job."""

    def __init__(self, lost=()):
        self.logs = {}
        self.lost = set(lost)
        self.finished = {}
        self.redis = self

    def pipeline(self, transaction=False):
        return RecordingPipeline(self)

    async def load_scripts(self):
        pass

    async def append_in(self, pipe, appends):
        lengths = []
        for job_id, _attempt, first_seq, payloads in appends:
            if job_id in self.lost:
                lengths.append(-1)
                continue
            log = self.logs.setdefault(job_id, [])
            assert len(log) == first_seq
            log.extend(ChunkEvent.decode(p) for p in payloads)
            lengths.append(len(log))
        pipe.answers.append(lengths)

    async def finish_in(self, pipe, job_id, model, attempt, event, seq, fields, batch=None, owner=""):
        if job_id in self.lost:
            pipe.answers.append(0)
            return
        log = self.logs.setdefault(job_id, [])
        assert len(log) == seq
        log.append(ChunkEvent.decode(event))
        self.finished[job_id] = fields
        pipe.answers.append(1)


async def test_publisher_coalesces_a_backlog_and_numbers_without_gaps():
    store = FakeStore()
    pub = ChunkPublisher(store, "w1")  # type: ignore[arg-type]
    # A backlog built up while the publisher was busy: two jobs interleaved.
    for i in range(5):
        pub.delta("a", 1, [ChoiceDelta(index=0, text=str(i), token_ids=[i])])
        pub.delta("b", 1, [ChoiceDelta(index=0, text="b", token_ids=[9])])
    task = asyncio.create_task(pub.run())
    usage = Usage(prompt_tokens=1, completion_tokens=5, total_tokens=6)
    assert await pub.finish("a", 1, "done", usage=usage, fields={"status": "completed"})
    pub.delta("b", 1, [ChoiceDelta(index=0, text="c", token_ids=[8])])
    assert await pub.finish("b", 1, "done", usage=usage, fields={"status": "completed"})
    task.cancel()
    a, b = store.logs["a"], store.logs["b"]
    assert [e.seq for e in a] == list(range(len(a))) and [e.seq for e in b] == list(range(len(b)))
    assert "".join(c.text for e in a for c in e.choices) == "01234" and a[-1].kind == "done"
    assert [t for e in a for c in e.choices for t in c.token_ids] == [0, 1, 2, 3, 4]
    assert "".join(c.text for e in b for c in e.choices) == "bbbbbc" and b[-1].kind == "done"
    # The backlog went out as one message per job, not one per token.
    assert len(a) == 2
    assert store.finished == {"a": {"status": "completed"}, "b": {"status": "completed"}}


async def test_a_job_taken_over_by_another_attempt_is_reported_lost():
    store = FakeStore(lost={"a"})
    lost = []
    pub = ChunkPublisher(store, "w1", on_lost=lost.append)  # type: ignore[arg-type]
    store.logs["c"] = [ChunkEvent(seq=i, kind="delta") for i in range(7)]
    task = asyncio.create_task(pub.run())
    pub.delta("a", 1, [ChoiceDelta(index=0, text="x", token_ids=[1])])
    pub.begin("c", 7)  # a retry continues its log where the earlier attempt stopped
    pub.delta("c", 2, [ChoiceDelta(index=0, text="y", token_ids=[2])])
    owned_a = await pub.finish("a", 1, "done", fields={"status": "completed"})
    owned_c = await pub.finish("c", 2, "done", fields={"status": "completed"})
    task.cancel()
    assert owned_a is False and lost == ["a"]
    assert owned_c is True and [e.seq for e in store.logs["c"]] == list(range(9))
    assert store.logs["c"][7].attempt == 2
