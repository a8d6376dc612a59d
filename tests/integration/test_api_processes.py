"""The API as several processes on one port (API_PROCESSES, `python -m api.serve`), from the
outside, on the session stack (two processes, the real engine): connections land on every
process, each process holds one Redis pub/sub connection whatever it streams, and a stream
started on one process is resumed and cancelled through another. On a fake-engine stack:
a SIGKILLed API process is replaced by uvicorn's supervisor while the other serves.

Which process answered a connection is read from /proc: the API's socket whose peer is
the client's local port belongs to exactly one of the API's processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port, redis_clients_by_pid, socket_inodes, subscriber  # noqa: E402

pytestmark = pytest.mark.integration
# Fresh connections tried before giving up on reaching another process (the kernel hands
# each to whichever process accepts it first; 2 processes: 2^-40 to miss one by chance).
TRIES = 40
FAKE_MODEL = "SmolLM2-135M-Instruct"


def local_port(resp: httpx.Response) -> int:
    sock = resp.extensions["network_stream"].get_extra_info("socket")
    return int(sock.getsockname()[1])


def serving_pid(stack: Stack, client_port: int) -> int:
    """The API process holding the server side of the client's connection from `client_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
                if local == stack.api_port and remote == client_port:
                    inodes.add(int(cols[9]))
    owners = [pid for pid in stack.api_pids() if socket_inodes(pid) & inodes]
    assert len(owners) == 1, (client_port, inodes, owners)
    return owners[0]


@contextlib.contextmanager
def on_another_process(
    stack: Stack, avoid: int, method: str, url: str, auth: dict[str, str], **kwargs: object
) -> Iterator[tuple[int, httpx.Response]]:
    """A streamed request on a fresh connection that an API process other than `avoid` took."""
    for _ in range(TRIES):
        with httpx.Client(base_url=stack.api_url, timeout=120, headers=auth) as c:
            with c.stream(method, url, **kwargs) as resp:  # type: ignore[arg-type]
                pid = serving_pid(stack, local_port(resp))
                if pid != avoid:
                    yield pid, resp
                    return
    raise AssertionError(f"{TRIES} connections all landed on process {avoid}")


def events(resp: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each SSE event as it arrives."""
    event_id: str | None = None
    for line in resp.iter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            yield event_id, line[5:].strip()
            event_id = None


def finish_reason(data: str) -> str | None:
    if data == "[DONE]":
        return None
    return next((c["finish_reason"] for c in json.loads(data)["choices"] if c.get("finish_reason")), None)


def test_connections_land_on_every_process_and_each_holds_one_subscriber_connection(stack, redis, api_processes):
    serving = stack.api_pids()
    assert api_processes > 1 and len(set(serving)) == api_processes
    seen: dict[int, int] = {}
    for _ in range(TRIES * api_processes):
        with httpx.Client(base_url=stack.api_url, timeout=30) as c:
            resp = c.get("/health")
            assert resp.status_code == 200
            pid = serving_pid(stack, local_port(resp))
        seen[pid] = seen.get(pid, 0) + 1
        if len(seen) == api_processes:
            break
    assert set(seen) == set(serving), seen
    # Every process's pub/sub traffic (its streams' channels, the batch runners' wake-ups)
    # shares one connection: CLIENT LIST shows exactly one subscriber per API process.
    clients = redis_clients_by_pid(redis.client_list(), serving, stack.redis_port)
    for pid in serving:
        subscribers = [c for c in clients[pid] if subscriber(c)]
        assert len(subscribers) == 1, (pid, subscribers)


def test_a_stream_started_on_one_process_is_resumed_and_cancelled_through_another(stack, model, api_key):
    auth = {"Authorization": f"Bearer {api_key}"}
    # The longest job the session's engine takes (8,192 tokens of context): the cancel must
    # find it running. With 2,000 tokens (about 60 s) a fresh-clone CI run once saw it end
    # first: the test's client lost about 30 s twice between the steps (the job and both
    # streams ran at normal speed); the step times go into the failure message.
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count from 1 to 8000, one number a line."}],
        "max_tokens": 8000,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        steps.append((name, round(time.monotonic() - start, 2)))

    with httpx.Client(base_url=stack.api_url, timeout=120, headers=auth) as a:
        with a.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            step("created")
            home = serving_pid(stack, local_port(first))
            step("home found")
            original = events(first)
            job_id, seq = None, None
            for _, data in original:
                chunk = json.loads(data)
                job_id, seq = chunk["id"], chunk.get("seq")
                if seq is not None and any(c["delta"].get("content") for c in chunk["choices"]):
                    break
            assert job_id is not None and seq is not None
            step("first content")
            url = f"/v1/chat/completions/{job_id}/stream"
            with on_another_process(stack, home, "GET", url, auth, headers={"Last-Event-ID": str(seq)}) as (
                other,
                resumed,
            ):
                step("resumed on another process")
                assert resumed.status_code == 200 and other != home
                follow = events(resumed)
                ids = []
                for event_id, data in follow:
                    assert event_id is not None and data != "[DONE]"
                    ids.append(int(event_id))
                    if len(ids) == 3:
                        break
                # Resumed exactly after the cursor, from another process's relay.
                assert ids[0] == seq + 1 and ids == sorted(set(ids)), (seq, ids, steps)
                with on_another_process(stack, home, "POST", f"/v1/chat/completions/{job_id}/cancel", auth) as (
                    canceller,
                    cancel,
                ):
                    step("cancel on another process")
                    assert canceller != home
                    cancel.read()
                    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled", (cancel.text, steps)
                # Both readers, on both processes, end with the cancellation.
                resumed_ends = [finish_reason(d) for _, d in follow]
                original_ends = [finish_reason(d) for _, d in original]
    assert "cancelled" in resumed_ends and "cancelled" in original_ends, (resumed_ends[-3:], original_ends[-3:])
    with httpx.Client(base_url=stack.api_url, timeout=30, headers=auth) as c:
        record = c.get(f"/v1/chat/completions/{job_id}").json()
    assert record["choices"][0]["finish_reason"] == "cancelled"


@pytest.fixture(scope="module")
def fake_stack(tmp_path_factory):
    """Two API processes before a fake engine whose steps (8 tokens) take 0.2 s."""
    logs = tmp_path_factory.mktemp("api-processes-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        api_processes=2,
        env={"ENGINE": "fake", "FAKE_STEP_SECONDS": "0.2", "WORKER_SLOTS": "4", "FILES_DIR": str(logs / "files")},
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.wait_ready(FAKE_MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def open_streams(stack: Stack) -> float:
    text = httpx.get(stack.api_url + "/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmq_open_streams "))


def test_a_killed_api_process_is_replaced_and_its_streams_resume_on_the_other(fake_stack):
    """uvicorn's supervisor starts a new process in place of one SIGKILLed; the other keeps
    serving, the cut stream resumes there to its end, and /metrics no longer counts the
    dead process's open stream (its live gauge is forgotten by the new process)."""
    stack = fake_stack
    before = set(stack.api_pids())
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
    with (
        httpx.Client(base_url=stack.api_url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as s,
    ):
        victim = serving_pid(stack, local_port(s))
        stream = events(s)  # kept: a generator dropped midway closes the connection
        first = next(chunk for _, data in stream if (chunk := json.loads(data)).get("seq") is not None)
        job_id, seq = first["id"], first["seq"]
        assert open_streams(stack) == 1  # summed over both processes, whichever answers
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in stream:
                pass
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(now := set(stack.api_pids())) < 2 or victim in now):
        time.sleep(0.2)
    replaced = set(stack.api_pids())
    assert victim not in replaced and len(replaced) == 2 and len(replaced & before) == 1, (before, replaced)
    stack.wait_ready(FAKE_MODEL, timeout=60)
    # Once the new process has started (it forgets the dead one's live gauge), whichever
    # process answers: no stream is open. Without that, the dead one's 1 stays for good.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and open_streams(stack) != 0:
        time.sleep(0.5)
    assert open_streams(stack) == 0
    with (
        httpx.Client(base_url=stack.api_url, timeout=60) as c,
        c.stream("GET", f"/v1/chat/completions/{job_id}/stream", headers={"Last-Event-ID": str(seq)}) as resumed,
    ):
        got = list(events(resumed))
    assert got[-1][1] == "[DONE]" and int(got[0][0]) == seq + 1
    assert finish_reason(got[-2][1]) == "length"
