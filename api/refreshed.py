"""Refreshed: a value the API reads from Redis and keeps for a while (the live models,
the live workers' slots), kept fresh without making a request wait for it.

A request that finds the value older than `fresh` seconds but younger than `stale` takes
it as it is and starts one read in the background, whose result the next request finds;
only a value older than `stale` (or none yet, or a caller asking for a fresh one) is
waited for. At a request every second or two (one stream), the waited-for reads cost
each request several Redis round trips before its job was even queued: about a
millisecond and a half of its first token (issue 12).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Refreshed(Generic[T]):
    def __init__(
        self,
        read: Callable[[], Awaitable[T]],
        fresh: float,
        stale: float,
        name: str = "value",
        clock: Callable[[], float] = time.monotonic,
    ):
        self._read = read
        self._clock = clock
        self.fresh = fresh
        self.stale = max(stale, fresh)
        self.name = name
        self._value: tuple[float, T] | None = None
        self._refresh: asyncio.Task[None] | None = None

    @property
    def value(self) -> T | None:
        """The value last read (None: never read), however old."""
        return self._value[1] if self._value else None

    async def get(self, fresh: bool = False) -> T:
        """The value: as kept if it is younger than `fresh` seconds; as kept, with a read
        started in the background, if it is younger than `stale`; else (or with `fresh`)
        read now."""
        now = self._clock()
        kept = self._value
        if not fresh and kept is not None:
            age = now - kept[0]
            if age < self.fresh:
                return kept[1]
            if age < self.stale:
                if self._refresh is None or self._refresh.done():
                    self._refresh = asyncio.create_task(self._read_quietly(), name=f"refresh-{self.name}")
                return kept[1]
        return await self.read()

    async def read(self) -> T:
        """Read the value now, and keep it."""
        started = self._clock()
        value = await self._read()
        # A read that started before the kept one (a slow background read) does not
        # replace a newer value.
        if self._value is None or self._value[0] <= started:
            self._value = (started, value)
        return value

    async def _read_quietly(self) -> None:
        try:
            await self.read()
        except Exception as exc:  # Redis unreachable: the next request past `stale` reads it and says so
            log.debug("background read of %s failed: %s", self.name, exc)

    async def aclose(self) -> None:
        """Cancel a background read still running."""
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            try:
                await self._refresh
            except (asyncio.CancelledError, Exception):
                pass
        self._refresh = None
