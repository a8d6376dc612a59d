"""The asyncio connections pack commands with hiredis (common.redis_client): the same bytes
as redis-py's Python packer, the same refusals, and a real Redis reads them back."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import DataError

from common.redis_client import connect, pack_commands_with_hiredis

ARGS = [
    ("SET", "k", "v"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    ("EVALSHA", "a" * 40, 2, "llmq:job:x", "llmq:log:x", 3600, -1, 0.1, 1e20, 1712345678.123456, "é ☃", b"\xff\x00"),
    ("RPUSH", "big", "x" * 100_000, b"y" * 7_000),  # past the Python packer's 6,000-byte chunking
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", bytearray(b"array")),  # hiredis refuses a bytearray: redis-py's serializer converts it
    (b"CONFIG GET", "maxmemory"),
]


def python_pack(conn: Connection, *args: object) -> bytes:
    return b"".join(AbstractConnection.pack_command.__wrapped__(conn, *args))  # type: ignore[attr-defined]


def test_hiredis_packs_what_the_python_packer_packed():
    assert pack_commands_with_hiredis()  # hiredis is a dependency: it must be the packer
    conn = Connection()
    for args in ARGS:
        assert b"".join(conn.pack_command(*args)) == python_pack(conn, *args), args[0]
    # A pipeline packs each command the same way.
    packed = b"".join(conn.pack_commands([ARGS[0], ARGS[2]]))
    assert packed == python_pack(conn, *ARGS[0]) + python_pack(conn, *ARGS[2])


@pytest.mark.parametrize("bad", [True, None, [1], {"a": 1}])
def test_what_redis_py_refuses_is_still_refused(bad):
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)


def test_another_encoding_keeps_the_python_packer():
    conn = Connection(encoding="latin-1")
    assert b"".join(conn.pack_command("SET", "k", "é")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"


async def test_a_real_redis_reads_back_what_was_packed(redis_url):
    client = connect(redis_url)
    try:
        echo = client.register_script("return ARGV")
        args = [3600, 0.1, "é ☃", "x" * 100_000, b"\xff\x00"]
        assert await echo(keys=["k"], args=args) == [b"3600", b"0.1", "é ☃".encode(), b"x" * 100_000, b"\xff\x00"]
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("a", "é").get("a").incrbyfloat("f", 0.5)
            assert await pipe.execute() == [True, "é".encode(), 0.5]
    finally:
        await client.aclose()
