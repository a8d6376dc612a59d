"""API keys, ownership and admission control from the outside, on real Redis, Celery
workers and API processes with the fake engine (what is tested is who may do what, and
what a client is told when the service is full, not the model)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import json
import os
import signal
import socket
import sys
import time

import aiohttp
import httpx
import openai
import pytest
import redis as redis_lib

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]
ALICE, BOB, ADMIN = "sk-alice-7f3a9c", "sk-bob-1d2e3f", "sk-admin-9a8b7c"
QUEUE_LIMIT = 8


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start(tmp_path_factory, name: str, env: dict[str, str], slots: int) -> Stack:
    logs = tmp_path_factory.mktemp(name)
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "WORKER_SLOTS": str(slots),
            "HEARTBEAT_SECONDS": "0.5",
            "FILES_DIR": str(logs / "files"),
            "API_KEYS": f"{ALICE},{BOB}",
            "ADMIN_API_KEYS": ADMIN,
            **env,
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    return s


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """Keys, a short queue (8 waiting) and a slow engine (0.1 s a step, 2 slots), so that
    a burst fills the queue."""
    s = start(
        tmp_path_factory,
        "tenancy-logs",
        {"MAX_QUEUED_JOBS": str(QUEUE_LIMIT), "FAKE_STEP_SECONDS": "0.1", "REAPER_INTERVAL_SECONDS": "0.5"},
        slots=2,
    )
    yield s
    s.stop()


def job_keys(s: Stack) -> int:
    return sum(1 for _ in redis_lib.Redis.from_url(s.redis_url).scan_iter("llmq:job:*"))


def wait(predicate, timeout: float = 60, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def waiting_now(s: Stack) -> int:
    return int(redis_lib.Redis.from_url(s.redis_url).zcard(f"llmq:waiting:{MODEL}"))


def drained(s: Stack) -> bool:
    r = redis_lib.Redis.from_url(s.redis_url)
    return r.zcard(f"llmq:waiting:{MODEL}") == 0 and r.zcard("llmq:leases") == 0


# -- API keys ---------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/" + MODEL),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/chat/completions/chatcmpl-x"),
    ("GET", "/v1/chat/completions/chatcmpl-x/stream"),
    ("POST", "/v1/chat/completions/chatcmpl-x/cancel"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file-x"),
    ("GET", "/v1/files/file-x/content"),
    ("DELETE", "/v1/files/file-x"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/batch_x"),
    ("POST", "/v1/batches/batch_x/cancel"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/health"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize(
    "key", [None, "sk-wrong", "", ALICE[:-1], ALICE + "x"], ids=["none", "wrong", "empty", "prefix", "longer"]
)
def test_every_route_but_health_needs_a_valid_key(tenants, method, path, key):
    headers = {} if key is None else {"Authorization": "Bearer"} if key == "" else bearer(key)
    resp = httpx.request(method, tenants.api_url + path, headers=headers, timeout=10)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"].startswith("Bearer")
    err = resp.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    if key:
        assert key not in resp.text  # never echoed


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(
    "target,host",
    [
        ("//v1/models", "127.0.0.1"),
        ("/health/../v1/models", "127.0.0.1"),
        ("/%761/models", "127.0.0.1"),  # /v1/models, percent-encoded
        ("/v1/%6dodels", "127.0.0.1"),
        ("/v1/models/", "127.0.0.1"),
        ("http://127.0.0.1/v1/models", "127.0.0.1"),  # absolute form
        ("/v1/models", "localhost/health"),
        ("/health%2f..%2fv1/models", "127.0.0.1"),
        ("/v1/chat/completions/x%2fcancel", "127.0.0.1"),
        ("/v1/health/../models", "127.0.0.1"),
    ],
)
def test_path_and_host_tricks_do_not_reach_a_protected_route(tenants, target, host):
    status, head = raw_request(tenants.api_port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status in (400, 401), head  # never 200: refused, or malformed for the server


def test_health_is_public_and_a_valid_key_works(tenants):
    for path in ("/health", "/v1/health", "/%68ealth"):
        resp = httpx.get(tenants.api_url + path, timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "ok", path
    for key in (ALICE, BOB, ADMIN):
        resp = httpx.get(tenants.api_url + "/v1/models", headers=bearer(key), timeout=10)
        assert resp.status_code == 200 and resp.json()["data"][0]["id"] == MODEL
    # The scheme is case-insensitive, as HTTP says.
    resp = httpx.get(tenants.api_url + "/v1/models", headers={"Authorization": f"bearer {ALICE}"}, timeout=10)
    assert resp.status_code == 200


def test_the_official_client_gets_an_authentication_error(tenants):
    client = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
    assert info.value.code == "invalid_api_key"


# -- ownership --------------------------------------------------------------------------


def test_another_key_cannot_see_follow_or_cancel_a_job(tenants):
    alice = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key=ALICE, max_retries=0)
    body = {"model": MODEL, "messages": HI, "max_tokens": 8 * 40, "background": True}
    job = httpx.post(tenants.api_url + "/v1/chat/completions", json=body, headers=bearer(ALICE), timeout=30).json()
    base = f"{tenants.api_url}/v1/chat/completions/{job['id']}"
    for method, url in (("GET", base), ("GET", base + "/stream"), ("POST", base + "/cancel")):
        resp = httpx.request(method, url, headers=bearer(BOB), timeout=30)
        assert resp.status_code == 404, (method, url, resp.text)
        assert resp.json()["error"]["code"] == "job_not_found"
    # Bob's cancel did nothing; Alice and the admin see the job, and Alice may cancel it.
    assert httpx.get(base, headers=bearer(ADMIN), timeout=30).json()["status"] in ("queued", "in_progress")
    assert httpx.post(base + "/cancel", headers=bearer(ALICE), timeout=30).json()["status"] == "cancelled"
    raw = alice.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=4)
    assert raw.http_response.status_code == 200 and raw.headers["x-request-id"] == raw.parse().id
    # Bob's own job is his: Alice gets 404 for it.
    bob_job = httpx.post(tenants.api_url + "/v1/chat/completions", json=body, headers=bearer(BOB), timeout=30).json()
    resp = httpx.get(f"{tenants.api_url}/v1/chat/completions/{bob_job['id']}", headers=bearer(ALICE), timeout=30)
    assert resp.status_code == 404
    httpx.post(f"{tenants.api_url}/v1/chat/completions/{bob_job['id']}/cancel", headers=bearer(BOB), timeout=30)


def batch_input(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": HI, "max_tokens": 8},
        }
        for i in range(n)
    ]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def test_files_and_batches_belong_to_their_key(tenants):
    alice = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    bob = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key=BOB, max_retries=0, timeout=60)
    admin = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    f = alice.files.create(file=("in.jsonl", io.BytesIO(batch_input(3))), purpose="batch")
    bob_file = bob.files.create(file=("b.jsonl", io.BytesIO(batch_input(1))), purpose="batch")
    for call in (
        lambda: bob.files.retrieve(f.id),
        lambda: bob.files.content(f.id),
        lambda: bob.files.delete(f.id),
        lambda: bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in bob.files.list()] and bob_file.id in [x.id for x in bob.files.list()]
    assert bob_file.id not in [x.id for x in alice.files.list()]
    assert {f.id, bob_file.id} <= {x.id for x in admin.files.list()}

    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in bob.batches.list()]
    assert batch.id in [b.id for b in alice.batches.list()] and batch.id in [b.id for b in admin.batches.list()]
    done = wait(lambda: (b := alice.batches.retrieve(batch.id)).status == "completed" and b, timeout=120)
    assert done.request_counts.completed == 3
    # Its output and its lines' jobs are Alice's too (batch line ids follow from the batch id).
    assert len(alice.files.content(done.output_file_id).text.splitlines()) == 3
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)
    line_job = json.loads(alice.files.content(done.output_file_id).text.splitlines()[0])["response"]["body"]["id"]
    url = f"{tenants.api_url}/v1/chat/completions/{line_job}"
    assert httpx.get(url, headers=bearer(BOB), timeout=10).status_code == 404
    assert httpx.get(url, headers=bearer(ALICE), timeout=10).json()["status"] == "completed"
    # Deleting is the owner's; then nobody sees it.
    assert alice.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        admin.files.retrieve(f.id)


# -- admission control ------------------------------------------------------------------


def test_a_full_queue_refuses_with_retry_after_and_writes_nothing(tenants):
    wait(lambda: drained(tenants))
    body = {"model": MODEL, "messages": HI, "max_tokens": 8 * 20, "background": True}  # 2 s each
    ids = []
    with httpx.Client(base_url=tenants.api_url, headers=bearer(ALICE), timeout=30) as h:
        while len(ids) < 2 + QUEUE_LIMIT:  # two running (the worker's slots), eight waiting
            resp = h.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["id"])
        wait(lambda: waiting_now(tenants) == QUEUE_LIMIT)
        before = job_keys(tenants)
        refused = h.post("/v1/chat/completions", json={**body, "background": False})
        assert refused.status_code == 429, refused.text
        err = refused.json()["error"]
        assert err["code"] == "engine_overloaded" and err["type"] == "requests"
        assert 1 <= int(refused.headers["retry-after"]) <= 120
        stream = h.post("/v1/chat/completions", json={**body, "background": False, "stream": True})
        assert stream.status_code == 429 and "retry-after" in stream.headers
        assert job_keys(tenants) == before  # nothing written for a refused request
        for job_id in ids:
            h.post(f"/v1/chat/completions/{job_id}/cancel")
    wait(lambda: drained(tenants))


def test_the_official_client_rides_out_a_short_overload(tenants):
    """The queue is full when the client asks; its own retry (honouring Retry-After)
    gets the answer once the queue moves again, with no user code. The worker is paused
    (SIGSTOP) while the queue is filled, so that the first answer is surely a 429."""
    wait(lambda: drained(tenants))
    worker = tenants.proc("worker1").popen.pid
    body = {"model": MODEL, "messages": HI, "max_tokens": 8 * 2, "background": True}
    seen: list[int] = []
    http_client = httpx.Client(event_hooks={"response": [lambda r: seen.append(r.status_code)]}, timeout=60)
    client = openai.OpenAI(base_url=tenants.api_url + "/v1", api_key=ALICE, max_retries=5, http_client=http_client)
    os.kill(worker, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=tenants.api_url, headers=bearer(BOB), timeout=30) as h:
            while h.post("/v1/chat/completions", json=body).status_code == 200:
                pass
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.chat.completions.create, model=MODEL, messages=HI, max_tokens=8)
            wait(lambda: seen)  # its first try was refused...
            os.kill(worker, signal.SIGCONT)  # ...and the queue moves on
            result = answer.result(timeout=120)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert result.choices[0].finish_reason == "length"
    assert seen[0] == 429 and seen[-1] == 200, seen
    wait(lambda: drained(tenants))


async def test_a_burst_of_2000_gets_429s_not_5xx_and_every_accepted_job_ends(tenants):
    """2,000 requests at once, each on its own connection (aiohttp: httpx's pool spends
    seconds per request scheduling that many, so that the client, not the service, would
    be measured)."""
    wait(lambda: drained(tenants))
    body = {"model": MODEL, "messages": HI, "max_tokens": 8}
    health: list[tuple[int, float]] = []
    statuses: collections.Counter[int] = collections.Counter()
    retry_after: set[str] = set()
    finished: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(tenants.api_url + "/v1/chat/completions", json=body, headers=bearer(ALICE)) as resp:
                payload = await resp.json()
                statuses[resp.status] += 1
                if resp.status == 429:
                    retry_after.add(resp.headers.get("retry-after", "missing"))
                elif resp.status == 200:
                    finished.append(payload["choices"][0]["finish_reason"])
        except aiohttp.ClientError:
            statuses[-1] += 1

    async def probe(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            async with session.get(tenants.api_url + "/health") as resp:
                await resp.read()
                health.append((resp.status, time.monotonic() - t0))
            await asyncio.sleep(0.2)

    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout) as probe_session,
    ):
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(probe_session, stop))
        await asyncio.gather(*(one(session) for _ in range(2000)))
        stop.set()
        await prober
    print(f"\nburst of 2000: {dict(statuses)}; Retry-After values {sorted(retry_after, key=str)}")
    times = sorted(t for _, t in health)
    print(f"/health during the burst: {len(times)} probes, median {times[len(times) // 2] * 1000:.0f} ms")
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0 and statuses[200] >= QUEUE_LIMIT
    assert "missing" not in retry_after and all(1 <= int(v) <= 120 for v in retry_after)
    assert finished == ["length"] * statuses[200]  # every accepted request got its answer
    assert health and all(code == 200 for code, _ in health)
    wait(lambda: drained(tenants))


# -- per-key limits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = start(
        tmp_path_factory,
        "limits-logs",
        {"MAX_CONCURRENT_JOBS_PER_KEY": "2", "REQUESTS_PER_MINUTE_PER_KEY": "6", "FAKE_STEP_SECONDS": "0.1"},
        slots=4,
    )
    yield s
    s.stop()


def test_per_key_concurrency_and_requests_per_minute(limited):
    if 60 - time.time() % 60 < 20:  # all of it inside one minute's window
        time.sleep(60 - time.time() % 60 + 0.5)
    body = {"model": MODEL, "messages": HI, "max_tokens": 8 * 30, "background": True}  # 3 s each
    with (
        httpx.Client(base_url=limited.api_url, headers=bearer(ALICE), timeout=30) as alice,
        httpx.Client(base_url=limited.api_url, headers=bearer(BOB), timeout=30) as bob,
    ):
        first = alice.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "6"
        assert first.headers["x-ratelimit-remaining-requests"] == "5"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        assert alice.post("/v1/chat/completions", json=body).status_code == 200
        busy = alice.post("/v1/chat/completions", json=body)  # third: two are hers already
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert "concurrent" in busy.json()["error"]["message"] and int(busy.headers["retry-after"]) >= 1
        assert busy.headers["x-ratelimit-remaining-requests"] == "3"  # a refused request counts
        # Bob is not held back by Alice's jobs.
        assert bob.post("/v1/chat/completions", json=body).status_code == 200
        # Once one of Alice's jobs ends, she may start another (her fourth request).
        assert alice.post(f"/v1/chat/completions/{first.json()['id']}/cancel").json()["status"] == "cancelled"
        fourth = alice.post("/v1/chat/completions", json=body)
        assert fourth.status_code == 200 and fourth.headers["x-ratelimit-remaining-requests"] == "2"
        for remaining in ("1", "0"):  # fifth and sixth: refused for concurrency, still counted
            resp = alice.post("/v1/chat/completions", json=body)
            assert resp.status_code == 429 and resp.headers["x-ratelimit-remaining-requests"] == remaining
        over = alice.post("/v1/chat/completions", json=body)
        assert over.status_code == 429 and "per minute" in over.json()["error"]["message"]
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert over.headers["x-ratelimit-remaining-requests"] == "0"
        # The official client sees the same error.
        client = openai.OpenAI(base_url=limited.api_url + "/v1", api_key=ALICE, max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        assert info.value.code == "rate_limit_exceeded"
