"""The API's StreamRelay on a real Redis: the streams that start (or end) together
subscribe (unsubscribe) their channels in one command on the shared connection (one
command a stream was about 4% of the API's CPU under load, issue 12), each subscription is
confirmed before it is handed out, and events still reach every reader."""

from __future__ import annotations

import asyncio

import pytest
import redis as redis_lib

from api.relay import StreamRelay
from common.jobs import ChunkEvent

pytestmark = pytest.mark.asyncio


def calls(redis_url: str, command: str) -> int:
    stats = redis_lib.Redis.from_url(redis_url).info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_streams_starting_together_subscribe_in_one_command(redis, redis_url):
    redis_lib.Redis.from_url(redis_url).config_resetstat()
    relay = StreamRelay(redis_url, buffer_events=8)
    await relay.start()
    try:
        await relay.subscribe("llmq:test:warm")  # connected (its home channel subscribed)
        before = calls(redis_url, "subscribe")
        subs = await asyncio.gather(*(relay.subscribe(f"llmq:test:ch{i}") for i in range(50)))
        assert calls(redis_url, "subscribe") - before == 1
        # Confirmed: Redis lists every channel, and a publish reaches its reader.
        channels = {c.decode() for c in await redis.pubsub_channels("llmq:test:ch*")}
        assert channels == {f"llmq:test:ch{i}" for i in range(50)}
        assert await redis.publish("llmq:test:ch7", ChunkEvent(seq=0, kind="delta").encode()) == 1
        event = await asyncio.wait_for(subs[7].get(), 5)
        assert event.seq == 0
        # A second reader of a subscribed channel sends nothing.
        again = await relay.subscribe("llmq:test:ch7")
        assert calls(redis_url, "subscribe") - before == 1
        await relay.unsubscribe(again)
        # Leaving together: one UNSUBSCRIBE.
        before_un = calls(redis_url, "unsubscribe")
        await asyncio.gather(*(relay.unsubscribe(s) for s in subs))
        for _ in range(100):
            if not await redis.pubsub_channels("llmq:test:ch*"):
                break
            await asyncio.sleep(0.02)
        assert await redis.pubsub_channels("llmq:test:ch*") == []
        assert calls(redis_url, "unsubscribe") - before_un == 1
    finally:
        await relay.stop()


async def test_a_channel_left_and_joined_in_one_turn_stays_subscribed(redis, redis_url):
    relay = StreamRelay(redis_url, buffer_events=8)
    await relay.start()
    try:
        first = await relay.subscribe("llmq:test:again")
        # The last reader leaves and a new one comes before the UNSUBSCRIBE went out: the
        # channel is not unsubscribed under the new reader.
        await relay.unsubscribe(first)
        joined = await relay.subscribe("llmq:test:again")
        await asyncio.sleep(0.1)
        assert await redis.publish("llmq:test:again", ChunkEvent(seq=3, kind="delta").encode()) == 1
        assert (await asyncio.wait_for(joined.get(), 5)).seq == 3
    finally:
        await relay.stop()


async def test_a_subscription_cancelled_before_it_is_confirmed_leaves_nothing(redis, redis_url):
    """A caller cancelled while its channel is being subscribed (a client that leaves as
    its stream resumes): no reader stays listed, the channel does not stay subscribed, and
    the channel can be subscribed again."""
    relay = StreamRelay(redis_url, buffer_events=8)
    await relay.start()
    try:
        await relay.subscribe("llmq:test:warm")  # connected
        for turns in (1, 2, 3):  # cancelled before the SUBSCRIBE went out, or after
            task = asyncio.create_task(relay.subscribe("llmq:test:gone"))
            for _ in range(turns):
                await asyncio.sleep(0)
            assert not task.done(), turns
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert relay.open_streams == 1, turns  # the warm-up reader only
            for _ in range(100):
                if b"llmq:test:gone" not in await redis.pubsub_channels("llmq:test:gone"):
                    break
                await asyncio.sleep(0.02)
            assert await redis.pubsub_channels("llmq:test:gone") == [], turns
        again = await asyncio.wait_for(relay.subscribe("llmq:test:gone"), 5)
        assert await redis.publish("llmq:test:gone", ChunkEvent(seq=1, kind="delta").encode()) == 1
        assert (await asyncio.wait_for(again.get(), 5)).seq == 1
    finally:
        await relay.stop()


async def test_messages_reach_readers_and_a_killed_connection_is_told_and_replaced(redis, redis_url):
    """The relay reads its connection itself (not redis-py's get_message): published
    events reach their readers in order, a listener channel calls its callback, the
    subscribe and unsubscribe confirmations keep redis-py's channel lists (nothing left
    behind), and a killed connection fails every reader with stream_interrupted (they
    catch up from the replay log) before a new connection serves new streams."""
    from api.relay import StreamClosed

    relay = StreamRelay(redis_url, buffer_events=64)
    heard: list[int] = []
    relay.listen("llmq:test:wake", lambda: heard.append(1))
    await relay.start()
    try:
        sub = await relay.subscribe("llmq:test:a")
        for seq in range(20):
            await redis.publish("llmq:test:a", ChunkEvent(seq=seq, kind="delta").encode())
        assert [(await asyncio.wait_for(sub.get(), 5)).seq for _ in range(20)] == list(range(20))
        assert await redis.publish("llmq:test:wake", "x") == 1
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == [1]

        others = await asyncio.gather(*(relay.subscribe(f"llmq:test:o{i}") for i in range(30)))
        await asyncio.gather(*(relay.unsubscribe(s) for s in others))
        for _ in range(100):
            if not await redis.pubsub_channels("llmq:test:o*"):
                break
            await asyncio.sleep(0.02)
        pubsub = relay._pubsub
        assert pubsub is not None
        await asyncio.sleep(0.1)  # the confirmations read
        names = {c.decode() if isinstance(c, bytes) else c for c in pubsub.channels}
        assert not any(n.startswith("llmq:test:o") for n in names), names
        assert not pubsub.pending_unsubscribe_channels

        killed = await redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        with pytest.raises(StreamClosed) as lost:
            await asyncio.wait_for(sub.get(), 5)
        assert lost.value.code == "stream_interrupted"
        fresh = await asyncio.wait_for(relay.subscribe("llmq:test:b"), 10)
        assert await redis.publish("llmq:test:b", ChunkEvent(seq=0, kind="delta").encode()) == 1
        assert (await asyncio.wait_for(fresh.get(), 5)).seq == 0
    finally:
        await relay.stop()
