"""A real Redis server for the job core's tests (one per session, on a free port, wiped
between tests), and helpers that build job records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from common.jobs import JobRecord, JobRequest, SamplingSpec, new_job_id

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import free_port, redis_answers  # noqa: E402


@pytest.fixture(scope="session")
def redis_url():
    port = free_port()
    folder = tempfile.mkdtemp(prefix="llmq-core-redis-")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while not redis_answers(port):
        if time.monotonic() > deadline:
            raise TimeoutError("redis-server did not start")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
async def redis(redis_url):
    redis_lib.Redis.from_url(redis_url).flushall()
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def job(model: str = "m", max_tokens: int = 8, n: int = 1, prompt: int = 3, **fields) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        model=model,
        request=JobRequest(prompt_token_ids=list(range(prompt)), sampling=SamplingSpec(max_tokens=max_tokens, n=n)),
        **fields,
    )
