"""The SSE response (api.routes.chat.sse) ends in the same turn of the event loop as its
last events: sse_starlette's send lock (an anyio Lock, whose acquire always yields to the
loop) made every stream's end wait behind a whole lap of the API's other work, 12 ms at
the median at 32 streams on the real engine (issue 12)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import anyio
import pytest

from api.routes.chat import sse, written_together

pytestmark = pytest.mark.asyncio


async def test_the_response_ends_without_a_lap_of_the_event_loop_after_done():
    laps = 0

    async def ticker() -> None:
        nonlocal laps
        while True:
            await asyncio.sleep(0)
            laps += 1

    async def batches():
        yield [{"data": '{"a": 1}'}]
        yield [{"data": '{"b": 2}'}, {"data": "[DONE]"}]

    sent: list[tuple[bytes, bool, int]] = []

    async def send(message) -> None:
        if message["type"] == "http.response.body":
            sent.append((bytes(message.get("body", b"")), bool(message.get("more_body")), laps))

    async def receive():
        await asyncio.Event().wait()  # the client stays

    ticking = asyncio.create_task(ticker())
    while laps < 3:
        await asyncio.sleep(0)
    try:
        settings = SimpleNamespace(sse_send_timeout_seconds=30.0)
        response = sse(settings, SimpleNamespace(id="chatcmpl-x"), written_together(batches()), anyio.Event())
        await response({"type": "http", "method": "POST"}, receive, send)
    finally:
        ticking.cancel()
    bodies = [body for body, _, _ in sent]
    assert bodies[-2].endswith(b"data: [DONE]\n\n") and sent[-1][:2] == (b"", False)
    # The end went out in the loop turn that wrote [DONE] (before: one lap later).
    assert sent[-1][2] == sent[-2][2], sent
