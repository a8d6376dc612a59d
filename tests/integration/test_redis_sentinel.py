"""The service on a replicated Redis watched by Redis Sentinel (REDIS_SENTINELS,
REDIS_SENTINEL_MASTER): a primary, a replica and a Sentinel started here, the fake
engine's worker, the API and Flower. Every connection finds the primary through the
Sentinel; the primary is then killed mid-stream, the Sentinel promotes the replica, and
the stream goes on to its end with every token once and in order, a request made while
there is no primary waits for the new one (no 503), new requests succeed, and nothing
restarts."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis as redis_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port, redis_answers  # noqa: E402

from common import keys  # noqa: E402
from worker.fake_engine import expected_text  # noqa: E402

pytestmark = pytest.mark.integration
FAKE_MODEL = "SmolLM2-135M-Instruct"
MASTER = "llmq-primary"
FLOWER_AUTH = ("ops", "sentinel-secret")


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except (redis_lib.RedisError, OSError):
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def sentinel_stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("sentinel-logs")
    replica_port, sentinel_port = free_port(), free_port()
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=free_port(),
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.05",
            "REDIS_SENTINELS": f"127.0.0.1:{sentinel_port}",
            "REDIS_SENTINEL_MASTER": MASTER,
            "FILES_DIR": str(logs / "files"),
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "API_KEYS": "",
        },
    )
    s.replica_port = replica_port  # type: ignore[attr-defined]
    s.sentinel_port = sentinel_port  # type: ignore[attr-defined]
    try:
        s.start_redis()
        s.spawn(
            "replica",
            [
                "redis-server",
                *("--port", str(replica_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(logs), "--replicaof", "127.0.0.1", str(s.redis_port)),
            ],
        )
        conf = logs / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {logs}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {s.redis_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        s.spawn("sentinel", ["redis-server", str(conf), "--sentinel"])
        wait_until(lambda: redis_answers(replica_port), 20, "replica")
        # The replica has its copy (Redis 7 starts a replica's first full sync 5 s after it
        # asks: a primary killed before then leaves a replica with nothing, and Sentinel
        # promotes it all the same; a CI run saw the stream end "Redis lost the job").
        replica = redis_lib.Redis(port=replica_port, decode_responses=True)
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 30, "the replica to sync")
        sentinel = redis_lib.Redis(port=sentinel_port, decode_responses=True)
        # The Sentinel has found the replica (through the primary) before anything relies on it.
        wait_until(lambda: sentinel.sentinel_slaves(MASTER), 30, "the Sentinel to see the replica")
        s.start_worker()
        s.start_api()
        s.start_flower()
        s.wait_ready(FAKE_MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def master_port(stack: Stack) -> int:
    sentinel = redis_lib.Redis(port=stack.sentinel_port, decode_responses=True)  # type: ignore[attr-defined]
    return int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])


def test_connections_find_the_primary_through_the_sentinel_and_survive_a_failover(sentinel_stack):
    s = sentinel_stack
    assert master_port(s) == s.redis_port
    client = openai.OpenAI(base_url=s.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Count."}]
    first = client.chat.completions.create(model=FAKE_MODEL, messages=messages, max_tokens=8)
    assert first.choices[0].message.content == expected_text(first.usage.prompt_tokens, 8)
    # Flower works through the Sentinel too: the job's task events, the queues page.
    flower = f"http://127.0.0.1:{s.flower_port}"
    info = wait_until(
        lambda: (
            (r := httpx.get(f"{flower}/api/task/info/{first.id}", auth=FLOWER_AUTH, timeout=5)).status_code == 200
            and r.json().get("state") == "SUCCESS"
        ),
        60,
        "Flower to see the job succeed",
    )
    assert info
    queues = httpx.get(f"{flower}/api/queues/length", auth=FLOWER_AUTH, timeout=10)
    assert queues.status_code == 200 and keys.chat_queue(FAKE_MODEL) in queues.text, queues.text

    # A long stream (2,000 tokens, 8 a step every 0.05 s: about 13 s); the primary dies
    # a few seconds in.
    max_tokens = 2000
    body = {"model": FAKE_MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
    text, reasons, errors, usage = [], [], [], None
    killed_at = None
    # A request made while there is no primary (killed, the Sentinel not yet switched):
    # the API retries Redis through the failover (15 s with Sentinel) instead of a 503.
    during: dict[str, object] = {}

    def request_during_failover() -> None:
        try:
            during["answer"] = client.chat.completions.create(model=FAKE_MODEL, messages=messages, max_tokens=8)
        except Exception as exc:  # noqa: BLE001 (kept for the assertion)
            during["error"] = exc

    asker = threading.Thread(target=request_during_failover)
    with httpx.Client(base_url=s.api_url, timeout=120) as h:
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            started = time.monotonic()
            for line in r.iter_lines():
                if killed_at is None and time.monotonic() - started > 2:
                    s.kill("redis")
                    killed_at = time.monotonic()
                    asker.start()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    if choice.get("finish_reason"):
                        reasons.append(choice["finish_reason"])
    assert killed_at is not None
    asker.join(timeout=60)
    assert "error" not in during, during
    answer = during["answer"]
    assert answer.choices[0].message.content == expected_text(answer.usage.prompt_tokens, 8)  # type: ignore[attr-defined]
    assert not errors, errors
    assert reasons == ["length"] and usage is not None
    # Every token once, in order, across the failover.
    assert "".join(text) == expected_text(usage["prompt_tokens"], max_tokens)
    # The Sentinel promoted the replica; the service writes there now.
    assert master_port(s) == s.replica_port  # type: ignore[attr-defined]
    after = client.chat.completions.create(model=FAKE_MODEL, messages=messages, max_tokens=8)
    assert after.choices[0].message.content == expected_text(after.usage.prompt_tokens, 8)
    with redis_lib.Redis(port=s.replica_port) as new_primary:  # type: ignore[attr-defined]
        assert new_primary.exists(keys.job(after.id))
    # Nothing restarted: the worker, the API and Flower lived through it.
    for name in ("worker1", "api", "flower"):
        assert s.proc(name).popen.poll() is None, name
