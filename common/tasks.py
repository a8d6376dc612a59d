"""Stopping background tasks for sure.

`task.cancel()` then `await asyncio.gather(...)` waits forever if a task's cancellation is
lost, and on Python 3.11 a library can lose it: `asyncio.wait_for` returns its inner
future's result when that finished at the moment the caller was cancelled (fixed in 3.12),
and a loop around such a call goes on. A worker's stop hung on its reaper that way (seen
in `make test`: a teardown waited the whole minute of `WorkerRuntime.stop` for it).
`cancel_and_wait` cancels again whatever is still running, every `nudge` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

NUDGE_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], nudge: float = NUDGE_SECONDS) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again each still
    running every `nudge` seconds. Their outcomes are read (no "exception was never
    retrieved"), not raised."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=nudge)
    for task in tasks:
        if not task.cancelled():
            task.exception()
