"""Publishes chunk events to each job's pub/sub channel.

All jobs of a worker share one publisher task: it drains whatever events are waiting,
merges consecutive deltas of the same job (so under load one Redis message carries
several tokens), numbers them per job without gaps, and sends the lot in one pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import keys
from common.jobs import ChoiceDelta, ChunkEvent, EventKind
from common.schemas import Usage

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job_id: str
    kind: EventKind
    choices: list[ChoiceDelta] = field(default_factory=list)
    usage: Usage | None = None
    error: dict[str, Any] | None = None
    flushed: asyncio.Future[None] | None = None


def merge_deltas(into: list[ChoiceDelta], more: list[ChoiceDelta]) -> list[ChoiceDelta]:
    by_index = {c.index: c.model_copy() for c in into}
    for c in more:
        have = by_index.get(c.index)
        if have is None:
            by_index[c.index] = c.model_copy()
        else:
            have.text += c.text
            have.tokens += c.tokens
            have.finish_reason = c.finish_reason or have.finish_reason
    return [by_index[i] for i in sorted(by_index)]


class ChunkPublisher:
    def __init__(self, redis: aioredis.Redis, retry_seconds: float = 0.5):
        self.redis = redis
        self.retry_seconds = retry_seconds
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._next_seq: dict[str, int] = {}

    def delta(self, job_id: str, choices: list[ChoiceDelta]) -> None:
        self._queue.put_nowait(_Pending(job_id, "delta", choices=choices))

    async def finish(
        self,
        job_id: str,
        kind: EventKind,
        *,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Queue a job's last event and wait until it (and all before it) reached Redis."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(job_id, kind, usage=usage, error=error, flushed=done))
        await done

    def _coalesce(self, batch: list[_Pending]) -> list[_Pending]:
        out: list[_Pending] = []
        last_delta: dict[str, _Pending] = {}
        for item in batch:
            prev = last_delta.get(item.job_id)
            if item.kind == "delta" and prev is not None:
                prev.choices = merge_deltas(prev.choices, item.choices)
                continue
            out.append(item)
            if item.kind == "delta":
                last_delta[item.job_id] = item
            else:
                last_delta.pop(item.job_id, None)
        return out

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            events = self._coalesce(batch)
            encoded: list[tuple[str, str]] = []
            for item in events:
                seq = self._next_seq.get(item.job_id, 0)
                self._next_seq[item.job_id] = seq + 1
                event = ChunkEvent(
                    seq=seq, kind=item.kind, choices=item.choices, usage=item.usage, error=item.error
                )
                encoded.append((keys.job_channel(item.job_id), event.encode()))
                if item.kind != "delta":
                    self._next_seq.pop(item.job_id, None)
            await self._send(encoded)
            for item in events:
                if item.flushed is not None and not item.flushed.done():
                    item.flushed.set_result(None)

    async def _send(self, encoded: list[tuple[str, str]]) -> None:
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, payload in encoded:
                        pipe.publish(channel, payload)
                    await pipe.execute()
                return
            except RedisError as exc:
                log.warning("publish failed (%s); retrying", exc)
                await asyncio.sleep(self.retry_seconds)
