"""Publishes chunk events: appended to each job's replay log and sent on its channel.

All jobs of a worker share one publisher task: it drains whatever events are waiting,
merges consecutive deltas of the same job (so under load one Redis message carries
several tokens), numbers them per job without gaps, and sends the lot in one pipeline:
every job's deltas in one script call, then the jobs' ends.
Each job's append is fenced by its attempt (see `JobStore`): if another attempt owns
the job now, the events are refused and `on_lost(job_id)` is called.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from common import timing
from common.jobs import ChoiceDelta, ChunkEvent, EventKind, extend_logprobs
from common.jobstore import JobStore
from common.schemas import Usage
from worker.metrics import PUBLISH_SECONDS

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job_id: str
    attempt: int
    kind: EventKind
    choices: list[ChoiceDelta] = field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None
    # The last event of an attempt carries the job's terminal record fields.
    fields: dict[str, Any] | None = None
    batch: str | None = None
    owner: str = ""
    started: float | None = None  # the last event: the record's `started`
    flushed: asyncio.Future[bool] | None = None
    # `choices` are the publisher's own copies (later deltas are merged into them in place).
    owned: bool = False


def _own(c: ChoiceDelta) -> ChoiceDelta:
    """A copy of a delta that merging may grow in place: its token ids and logprobs lists
    are new (what `ChoiceDelta.extend` mutates); tool calls are merged into new lists."""
    return c.model_copy(
        update={"token_ids": list(c.token_ids), "logprobs": extend_logprobs(None, c.logprobs) if c.logprobs else None}
    )


def _extend(into: list[ChoiceDelta], more: list[ChoiceDelta]) -> None:
    """Merge `more` into `into` (owned copies, see `_own`) in place, per choice index."""
    by_index = {c.index: c for c in into}
    added = False
    for c in more:
        have = by_index.get(c.index)
        if have is None:
            by_index[c.index] = _own(c)
            into.append(by_index[c.index])
            added = True
        else:
            have.extend(c)
    if added:
        into.sort(key=lambda c: c.index)


def _deltas(group: list[tuple[_Pending, str]]) -> list[tuple[_Pending, str]]:
    """A job's events of a publish but its last, if that is its end (written by `finish`)."""
    return group[:-1] if group[-1][0].fields is not None else group


def merge_deltas(into: list[ChoiceDelta], more: list[ChoiceDelta]) -> list[ChoiceDelta]:
    """`into` and `more` as one list of deltas per choice (neither is changed)."""
    out = [_own(c) for c in into]
    _extend(out, more)
    return out


class ChunkPublisher:
    def __init__(
        self, store: JobStore, model: str, on_lost: Callable[[str], None] | None = None, retry_seconds: float = 0.5
    ):
        self.store = store
        self.model = model
        self.on_lost = on_lost
        self.retry_seconds = retry_seconds
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._next_seq: dict[str, int] = {}
        self._publish_seconds = PUBLISH_SECONDS.labels(model)

    def begin(self, job_id: str, next_seq: int) -> None:
        """A job's attempt starts; its events continue the log at `next_seq`."""
        self._next_seq[job_id] = next_seq

    def forget(self, job_id: str) -> None:
        """A job that ends without a last event of ours (another attempt owns it)."""
        self._next_seq.pop(job_id, None)

    def delta(self, job_id: str, attempt: int, choices: list[ChoiceDelta]) -> None:
        self._queue.put_nowait(_Pending(job_id, attempt, "delta", choices=choices))

    async def finish(
        self,
        job_id: str,
        attempt: int,
        kind: EventKind,
        *,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
        fields: dict[str, Any],
        batch: str | None = None,
        owner: str = "",
        started: float | None = None,
    ) -> bool:
        """Queue a job's last event, written together with its terminal record `fields`,
        and wait until it (and all before it) reached Redis. False if the job belonged to
        another attempt by then."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            _Pending(
                job_id,
                attempt,
                kind,
                usage=usage,
                error=error,
                fields=fields,
                batch=batch,
                owner=owner,
                started=started,
                flushed=done,
            )
        )
        return await done

    def _coalesce(self, batch: list[_Pending]) -> list[_Pending]:
        out: list[_Pending] = []
        last_delta: dict[str, _Pending] = {}
        for item in batch:
            prev = last_delta.get(item.job_id)
            if item.kind == "delta" and prev is not None and prev.attempt == item.attempt:
                # Copied once per publish, then grown in place: a backlog of k steps costs
                # k merges, not k copies of everything merged so far.
                if not prev.owned:
                    prev.choices = [_own(c) for c in prev.choices]
                    prev.owned = True
                _extend(prev.choices, item.choices)
                continue
            out.append(item)
            if item.kind == "delta":
                last_delta[item.job_id] = item
            else:
                last_delta.pop(item.job_id, None)
        return out

    async def run(self) -> None:
        # Loaded up front: pipelines run them by SHA (a NoScriptError after a Redis restart
        # loads them again).
        await self.store.load_scripts()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = self._coalesce(batch)
            # One fenced append per job (and attempt), in order.
            groups: dict[tuple[str, int], list[tuple[_Pending, str]]] = {}
            firsts: dict[tuple[str, int], int] = {}
            for item in items:
                seq = self._next_seq.get(item.job_id, 0)
                self._next_seq[item.job_id] = seq + 1
                event = ChunkEvent(
                    seq=seq,
                    kind=item.kind,
                    attempt=item.attempt,
                    choices=item.choices,
                    usage=item.usage,
                    error=item.error,
                    started=item.started,
                )
                firsts.setdefault((item.job_id, item.attempt), seq)
                groups.setdefault((item.job_id, item.attempt), []).append((item, event.encode()))
                if item.kind != "delta":
                    self._next_seq.pop(item.job_id, None)
            try:
                results = await self._send(groups, firsts)
            except Exception as exc:
                # Never leave a job waiting on a batch that cannot be sent.
                log.exception("publishing a batch failed")
                for group in groups.values():
                    for item, _ in group:
                        if item.flushed is not None and not item.flushed.done():
                            item.flushed.set_exception(exc)
                continue
            for (job_id, _), ok, group in zip(groups, results, groups.values(), strict=True):
                if not ok and self.on_lost is not None:
                    self.on_lost(job_id)
                for item, _ in group:
                    if item.flushed is not None and not item.flushed.done():
                        item.flushed.set_result(ok)

    async def _send(
        self, groups: dict[tuple[str, int], list[tuple[_Pending, str]]], firsts: dict[tuple[str, int], int]
    ) -> list[bool]:
        while True:
            try:
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    # Every job's deltas in one script call, first; then the jobs' ends.
                    appends: list[tuple[str, int, int, list[str]]] = []
                    for (job_id, attempt), group in groups.items():
                        deltas = _deltas(group)
                        if deltas:
                            appends.append((job_id, attempt, firsts[(job_id, attempt)], [p for _, p in deltas]))
                    if appends:
                        await self.store.append_in(pipe, appends)
                    for (job_id, attempt), group in groups.items():
                        last, event = group[-1]
                        if last.fields is not None:
                            await self.store.finish_in(
                                pipe,
                                job_id,
                                self.model,
                                attempt,
                                event,
                                firsts[(job_id, attempt)] + len(group) - 1,
                                last.fields,
                                last.batch,
                                last.owner,
                            )
                    # One round trip: what llmq_worker_publish_seconds measures.
                    if timing.ENABLED:
                        timing.stamp_all([job_id for job_id, _ in groups], "publish")
                    sent = time.perf_counter()
                    answers = iter(await pipe.execute())
                    if timing.ENABLED:
                        timing.stamp_all([job_id for job_id, _ in groups], "published")
                    self._publish_seconds.observe(time.perf_counter() - sent)
                # An append answers the log length (-1: the attempt lost the job); a finish 1 or 0.
                lengths = iter(next(answers) if appends else ())
                owned = []
                for group in groups.values():
                    appended = int(next(lengths)) >= 0 if _deltas(group) else True
                    finished = int(next(answers)) == 1 if group[-1][0].fields is not None else True
                    owned.append(appended and finished)
                return owned
            except NoScriptError:
                # Redis lost its scripts (restarted): load them and send the batch again.
                log.warning("Redis has lost the publish scripts; loading them again")
                try:
                    await self.store.load_scripts()
                except RedisError as exc:
                    log.warning("loading the scripts failed (%s); retrying", exc)
                    await asyncio.sleep(self.retry_seconds)
            except RedisError as exc:
                log.warning("publish failed (%s); retrying", exc)
                await asyncio.sleep(self.retry_seconds)
