"""Workers on separate simulated hosts (issue 12): network namespaces made here, each
reaching Redis over a veth link of its own (scripts/hosts.py), Redis with a password on
the bridge's address as on a network, the API in the root namespace. Workers join and
leave with no API restart, and a host lost mid-load (its link down, then its processes
SIGKILLed: nobody hears its sockets close) loses no accepted job: every one ends
completed, those it held continued on another host. Fake engine (positional text, so a
lost, repeated or reordered piece shows); leases as short as test_resilience's."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis as redis_lib

from common.settings import get_settings
from tests.integration.sse import read_sse
from worker.fake_engine import expected_text

sys.path.insert(0, "scripts")
from hosts import HostNet, HostStack, SimHost, namespaces_supported  # noqa: E402
from stack import free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = get_settings().model_name
SLOTS = 4
PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon."}]
TERMINAL = {"completed", "failed", "cancelled"}
LOGS: list[Any] = []  # the module stack's log folder, named by failed waits


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostStack]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN)")
    refused = namespaces_supported()
    assert refused is None, f"this machine refuses network namespaces: {refused}"
    logs = tmp_path_factory.mktemp("hosts-logs")
    LOGS[:] = [logs]
    net = HostNet.create()
    s = HostStack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        net=net,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.1",
            "HEARTBEAT_SECONDS": "1",
            "WORKER_TTL_SECONDS": "4",
            "LEASE_SECONDS": "4",
            "REAPER_INTERVAL_SECONDS": "1",
            # A message a dead host's connection took (see the loss test) is sent again soon.
            "QUEUE_RESEND_SECONDS": "3",
            "MAX_ATTEMPTS": "3",
            "WORKER_SLOTS": str(SLOTS),
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_api()
        wait_until(lambda: s.health() is not None, 60, "the API answers")
        yield s
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            sys.stderr.write(
                f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]) + "\n"
            )
        raise
    finally:
        try:
            net.close(s)
            s.stop()
        finally:
            assert net.leftovers() == [], f"namespaces or links left behind: {net.leftovers()}"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not seen: {what} (process logs: {LOGS[0] if LOGS else '-'})")


def rclient(s: HostStack) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(s.redis_url, decode_responses=True)


def registered(s: HostStack) -> dict[str, dict[str, Any]]:
    """The worker registry: every registered worker's record, by worker id."""
    r = rclient(s)
    ids = [str(i) for i in r.zrange("llmq:workers", 0, -1)]
    raws = r.mget([f"llmq:worker:{i}" for i in ids]) if ids else []
    return {i: json.loads(raw) for i, raw in zip(ids, raws, strict=True) if raw}


def on_host(worker_id: str | None, host: SimHost) -> bool:
    return bool(worker_id) and f"@{host.netns}/" in str(worker_id)


def models(s: HostStack) -> list[str]:
    resp = httpx.get(s.api_url + "/v1/models", timeout=10)
    resp.raise_for_status()
    return [m["id"] for m in resp.json()["data"]]


def record(s: HostStack, job_id: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in rclient(s).hgetall(f"llmq:job:{job_id}").items()}


def peers(s: HostStack) -> set[str]:
    """The addresses Redis's clients connect from."""
    return {c["addr"].rsplit(":", 1)[0] for c in rclient(s).client_list()}


def submit_background(s: HostStack, max_tokens: int) -> str:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "background": True,
        "ignore_eos": True,
    }
    resp = httpx.post(s.api_url + "/v1/chat/completions", json=body, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["id"])


def submit_many(s: HostStack, n: int, max_tokens: int) -> list[str]:
    """`n` background jobs posted at once (so they meet the workers together, however
    slow this machine answers one POST)."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: submit_background(s, max_tokens), range(n)))


def final(s: HostStack, job_id: str) -> dict[str, Any]:
    resp = httpx.get(s.api_url + f"/v1/chat/completions/{job_id}", timeout=30)
    resp.raise_for_status()
    return dict(resp.json())


def assert_completed_whole(s: HostStack, job_id: str, max_tokens: int) -> dict[str, Any]:
    done = final(s, job_id)
    assert done["status"] == "completed", (job_id, done.get("status"), record(s, job_id))
    assert done["usage"]["completion_tokens"] == max_tokens
    assert done["choices"][0]["message"]["content"] == expected_text(done["usage"]["prompt_tokens"], max_tokens)
    return done


def test_workers_on_hosts_join_and_leave_with_no_api_restart(hstack: HostStack) -> None:
    s, net = hstack, hstack.net
    assert net is not None
    api = s.proc("api")
    assert models(s) == [] and registered(s) == {}

    # Host 1 joins: its worker registers over its link, and the API lists the model.
    h1 = net.add_host()
    net.start_worker(s, h1, "w1")
    wait_until(lambda: MODEL in models(s), 60, "the model listed once host 1's worker is up")
    (info,) = registered(s).values()
    assert on_host(info["id"], h1)
    # It reached Redis from its own address (over the veth), and announces its metrics there.
    assert h1.address in peers(s)
    assert info["metrics_url"].startswith(f"http://{h1.address}:")
    assert httpx.get(info["metrics_url"], timeout=10).status_code == 200

    # Host 2 joins: more jobs at once than one worker holds, so both serve some.
    h2 = net.add_host()
    net.start_worker(s, h2, "w2")
    wait_until(lambda: len(registered(s)) == 2, 60, "host 2's worker registered")
    assert h2.address in peers(s)
    jobs = submit_many(s, 3 * SLOTS, 160)
    wait_until(lambda: all(record(s, j).get("status") in TERMINAL for j in jobs), 60, "the jobs ended")
    for j in jobs:
        assert_completed_whole(s, j, 160)
    served = {record(s, j)["worker"] for j in jobs}
    assert any(on_host(w, h1) for w in served) and any(on_host(w, h2) for w in served), served

    # Host 1 leaves (its worker stopped in order): it unregisters; the model stays listed.
    net.stop_host(s, h1)
    wait_until(lambda: len(registered(s)) == 1, 30, "host 1's worker unregistered")
    assert all(on_host(w, h2) for w in registered(s))
    assert models(s) == [MODEL]
    job = submit_background(s, 16)
    wait_until(lambda: record(s, job).get("status") in TERMINAL, 30, "a job after host 1 left ended")
    assert_completed_whole(s, job, 16)
    assert on_host(record(s, job)["worker"], h2)

    # The last host leaves: no model. A new host joins: the model is back.
    net.stop_host(s, h2)
    wait_until(lambda: models(s) == [], 30, "no model once every host left")
    h3 = net.add_host()
    net.start_worker(s, h3, "w3")
    wait_until(lambda: MODEL in models(s), 60, "the model listed again once host 3 joined")
    job = submit_background(s, 16)
    wait_until(lambda: record(s, job).get("status") in TERMINAL, 30, "a job on host 3 ended")
    assert_completed_whole(s, job, 16)
    assert on_host(record(s, job)["worker"], h3)

    # All the while one and the same API process.
    assert s.proc("api") is api and api.popen.poll() is None
    net.stop_host(s, h3)


async def stream(s: HostStack, max_tokens: int) -> tuple[Any, ...]:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=s.api_url, timeout=120) as h:
        got = await read_sse(h, "POST", "/v1/chat/completions", json_body=body)
    usage = next((c["usage"] for c in got.chunks if c.get("usage")), None)
    return got, usage


async def test_losing_a_host_mid_load_loses_no_accepted_job(hstack: HostStack) -> None:
    s, net = hstack, hstack.net
    assert net is not None
    hosts = [net.add_host() for _ in range(3)]
    for h in hosts:
        net.start_worker(s, h, f"{h.name}-w")
    wait_until(lambda: len(registered(s)) == 3, 60, "three hosts' workers registered")
    victim = hosts[1]
    # About 6 s a job (48 steps of 0.1 s): the loss lands while they run.
    tokens = 384
    loop = asyncio.get_running_loop()

    # Before: 11 jobs for the 12 slots, 2 of them streamed through the API. Any two hosts
    # hold at most 8, so the one to be lost runs a background job or more, and likely
    # keeps a slot free: its consumer then waits in BRPOP when it goes, and Redis hands
    # the next message to the dead connection, to be sent again by the sweeper
    # (QUEUE_RESEND_SECONDS).
    before = await loop.run_in_executor(None, submit_many, s, 2 * SLOTS + 1, tokens)
    streams = [asyncio.create_task(stream(s, tokens)) for _ in range(2)]
    held = await loop.run_in_executor(
        None,
        wait_until,
        lambda: [
            j
            for j in before
            if record(s, j).get("status") == "in_progress" and on_host(record(s, j).get("worker"), victim)
        ],
        60,
        "a job running on the host about to be lost",
    )
    # The host is gone: link down, then its processes SIGKILLed.
    net.lose_host(s, victim)
    # During: jobs accepted while the loss is not yet noticed.
    during = await loop.run_in_executor(None, submit_many, s, SLOTS, tokens)
    streams += [asyncio.create_task(stream(s, tokens)) for _ in range(2)]

    everything = before + during
    await loop.run_in_executor(
        None,
        wait_until,
        lambda: all(record(s, j).get("status") in TERMINAL for j in everything),
        80,
        "every accepted job ended",
    )
    results = await asyncio.wait_for(asyncio.gather(*streams), 60)

    for j in everything:
        assert_completed_whole(s, j, tokens)
    # What the lost host held was continued elsewhere, as a new attempt.
    for j in held:
        rec = record(s, j)
        assert int(rec["attempt"]) >= 2 and not on_host(rec["worker"], victim), rec
    # Nothing accepted during the loss ran on the lost host.
    for j in during:
        assert not on_host(record(s, j)["worker"], victim)
    for got, usage in results:
        assert got.done and not got.errors and got.finish_reasons == ["length"]
        assert usage["completion_tokens"] == tokens
        assert got.text == expected_text(usage["prompt_tokens"], tokens)
    # The lost host's worker is out of the registry; the others and the model remain.
    await loop.run_in_executor(
        None, wait_until, lambda: len(registered(s)) == 2, 30, "the lost host's worker out of the registry"
    )
    assert not any(on_host(w, victim) for w in registered(s))
    assert models(s) == [MODEL]
    for h in hosts:
        net.stop_host(s, h)


def wait_for_brpop(s: HostStack, host: SimHost, timeout: float = 30) -> None:
    """Until Redis receives a BRPOP from `host` (MONITOR): its worker's consumer has just
    blocked, for kombu's BRPOP timeout (1 s)."""
    r = redis_lib.Redis.from_url(s.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    with r.monitor() as monitor:
        for item in monitor.listen():
            if item.get("client_address") == host.address and str(item.get("command", "")).upper().startswith("BRPOP"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no BRPOP from {host.address} seen")


def test_a_host_lost_while_idle_delays_no_job_past_the_resend(hstack: HostStack) -> None:
    """An idle worker waits in BRPOP (kombu sends it again every second). Lost with its
    link, it never answers, and Redis, which never heard its connection close, hands the
    next message to that dead connection: the job stays queued and no live worker is told.
    The sweeper sends its message again after QUEUE_RESEND_SECONDS (3 s here; 30 s by
    default), and a live host runs it."""
    s, net = hstack, hstack.net
    assert net is not None
    kept = net.add_host()
    net.start_worker(s, kept, f"{kept.name}-w")
    wait_until(lambda: len(registered(s)) == 1, 60, "the first host's worker registered")
    # The host that stays is busy (every slot held: its consumer is not in BRPOP), so the
    # lost host's consumer is the only one waiting for the next message. Its jobs are long
    # enough to outlast the second worker's start, however slow, and are cancelled after.
    busy = submit_many(s, SLOTS, 8000)
    wait_until(
        lambda: all(record(s, j).get("status") == "in_progress" for j in busy), 60, "the first host's slots full"
    )
    lost = net.add_host()
    net.start_worker(s, lost, f"{lost.name}-w")
    wait_until(lambda: len(registered(s)) == 2, 60, "the second host's worker registered")
    # Its link goes down right after its consumer blocked, and the job is posted while
    # Redis still holds that BRPOP (the rest of its second); then its processes die.
    wait_for_brpop(s, lost)
    net.cut(lost)
    job = submit_background(s, 16)
    net.lose_host(s, lost)
    assert all(record(s, j).get("status") == "in_progress" for j in busy)
    for j in busy:
        httpx.post(s.api_url + f"/v1/chat/completions/{j}/cancel", timeout=30).raise_for_status()
    wait_until(lambda: record(s, job).get("status") in TERMINAL, 60, "the job posted at the loss ended")
    assert_completed_whole(s, job, 16)
    assert on_host(record(s, job)["worker"], kept)
    # Whether its message went into the dead connection this time (almost every run).
    print("resends of the job posted at the loss:", record(s, job).get("resends"))
    wait_until(lambda: all(record(s, j).get("status") in TERMINAL for j in busy), 60, "the long jobs ended")
    net.stop_host(s, kept)


def log_tokens(s: HostStack, job_id: str) -> int:
    """Tokens in a job's replay log: every attempt's appends that Redis accepted."""
    events = [json.loads(e) for e in rclient(s).lrange(f"llmq:events:{job_id}", 0, -1)]
    return sum(len(c.get("token_ids", [])) for e in events for c in e.get("choices", []))


def test_a_partitioned_host_is_fenced_off_and_serves_again_once_healed(hstack: HostStack) -> None:
    """A host cut off but still running (its link down, its worker alive): its leases lapse
    and its jobs continue on another host; when the link comes back its open connections
    deliver what it sent meanwhile, and those late writes are refused (attempt fence), so
    every answer is whole with nothing twice. It registers again and takes jobs again, with
    no restart of anything."""
    s, net = hstack, hstack.net
    assert net is not None
    kept, cut = net.add_host(), net.add_host()
    net.start_worker(s, kept, f"{kept.name}-w")
    net.start_worker(s, cut, f"{cut.name}-w")
    wait_until(lambda: len(registered(s)) == 2, 60, "both hosts' workers registered")
    worker = s.proc(f"{cut.name}-w")
    tokens = 400
    jobs = submit_many(s, 2 * SLOTS - 1, tokens)
    held = wait_until(
        lambda: [
            j for j in jobs if record(s, j).get("status") == "in_progress" and on_host(record(s, j).get("worker"), cut)
        ],
        60,
        "a job running on the host to be cut off",
    )
    net.cut(cut)
    wait_until(lambda: all(int(record(s, j)["attempt"]) >= 2 for j in held), 60, "the cut-off host's jobs taken over")
    assert not any(on_host(w, cut) for w in registered(s))
    net.restore(cut)
    wait_until(lambda: any(on_host(w, cut) for w in registered(s)), 60, "the healed host registered again")
    wait_until(lambda: all(record(s, j).get("status") in TERMINAL for j in jobs), 60, "every job ended")
    for j in jobs:
        assert_completed_whole(s, j, tokens)
        assert log_tokens(s, j) == tokens, (j, record(s, j))
    for j in held:
        assert not on_host(record(s, j)["worker"], cut)

    # The same worker process, healed, takes jobs again.
    def served_by_healed() -> bool:
        batch = submit_many(s, 2 * SLOTS, 16)
        wait_until(lambda: all(record(s, j).get("status") in TERMINAL for j in batch), 60, "a batch after the heal")
        for j in batch:
            assert_completed_whole(s, j, 16)
        return any(on_host(record(s, j)["worker"], cut) for j in batch)

    wait_until(served_by_healed, 90, "a job served by the healed host", step=1)
    assert worker.popen.poll() is None
    net.stop_host(s, kept)
    net.stop_host(s, cut)
