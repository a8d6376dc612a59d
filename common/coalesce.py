"""Coalescer: calls made while one round trip is in flight go out together in the next.

A worker takes jobs from Celery one task at a time, but under load they arrive many a
millisecond, and each one's claim was a round trip of its own: the redis-py pipeline,
its connection checkout and its reply parsing cost the worker's one core more than the
claim itself. A `Coalescer` runs the first call at once (on the next turn of the event
loop, with whatever else arrived in the same turn), and the calls made meanwhile in one
batch when it is back: one round trip for many, no waiting added for a lone call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class Coalescer(Generic[A, R]):
    """`await coalescer(arg)` is `(await run([arg, ...]))[i]` for the batch it went out in.

    `run` answers one result per argument, in order. If it raises, every call of that
    batch raises the same exception (each caller decides what to do: the claims retry
    one by one). One batch is in flight at a time, at most `limit` calls each; a loop of
    its own per event loop is not needed (one instance serves one event loop).
    """

    def __init__(self, run: Callable[[list[A]], Awaitable[list[R]]], limit: int = 256):
        self._run = run
        self._limit = limit
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._draining = False

    async def __call__(self, arg: A) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((arg, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[A, asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch = self._pending[: self._limit]
                del self._pending[: self._limit]
                try:
                    results = await self._run([arg for arg, _ in batch])
                except Exception as exc:  # each caller gets it (and may retry on its own)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # not a caller that was cancelled meanwhile
                        future.set_result(result)
        finally:
            self._draining = False
            for _, future in batch + self._pending:  # only if the drain itself was cancelled
                if not future.done():
                    future.cancel()
            self._pending.clear()
