"""Chaos: workers killed, Redis and API processes restarted and Redis connections dropped at
random (seeded) times while streams, background jobs and a batch run on the fake engine;
then, with the faults stopped, every accepted job must have ended, every stream must have
reached `[DONE]`, and every completed stream's text must equal its stored result.

Its own stack: Redis with append-only persistence, two workers (ENGINE=fake, slowed down
so jobs are in flight when faults hit), two API processes, short liveness settings.

    CHAOS_SEED=7           the seed (default 1234); a comma list runs one stack per seed
    CHAOS_FAULTS=0         no faults (checks the harness itself); N: N faults (default 12)
    CHAOS_SECONDS=45       how long load and faults run
    CHAOS_DRAIN_SECONDS=90 how long, after that, jobs and streams get to end
    CHAOS_STEP_SECONDS     the fake engine's step time (default 0.03 s, 8 tokens a step)
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from common.settings import get_settings
from worker.fake_engine import expected_text

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = get_settings().model_name
SEEDS = [int(s) for s in os.environ.get("CHAOS_SEED", "1234").split(",") if s.strip()]
FAULTS = int(os.environ.get("CHAOS_FAULTS", "12"))
LOAD_SECONDS = float(os.environ.get("CHAOS_SECONDS", "45"))
DRAIN_SECONDS = float(os.environ.get("CHAOS_DRAIN_SECONDS", "90"))
STEP_SECONDS = os.environ.get("CHAOS_STEP_SECONDS", "0.03")
APIS = ("api", "api2")
STREAMERS = 6  # concurrent streaming clients
POLLERS = 3  # concurrent background-job clients
BATCH_LINES = 100
TERMINAL = {"completed", "failed", "cancelled"}
BATCH_TERMINAL = {"completed", "failed", "cancelled", "expired"}
ENV = {
    "ENGINE": "fake",
    "FAKE_STEP_SECONDS": STEP_SECONDS,
    "WORKER_SLOTS": "8",
    "HEARTBEAT_SECONDS": "1",
    "WORKER_TTL_SECONDS": "4",
    "REAPER_INTERVAL_SECONDS": "1",
    "MAX_ATTEMPTS": "5",
    "LEASE_SECONDS": "4",
    "QUEUE_RESEND_SECONDS": "5",
    "BROKER_VISIBILITY_TIMEOUT": "30",
    "SSE_PING_SECONDS": "2",
}


@dataclass
class StreamRun:
    """What one client saw of one job's stream, across all its connections."""

    job_id: str
    background: bool
    text: list[str] = field(default_factory=list)
    last_id: int | None = None
    connections: int = 0
    done: bool = False  # `[DONE]` after the job's own last event
    finish_reasons: list[str] = field(default_factory=list)
    job_error: dict[str, Any] | None = None  # the job's own error event (it carries an id)
    interruptions: list[str] = field(default_factory=list)  # why each connection ended early
    anomalies: list[str] = field(default_factory=list)


@dataclass
class Chaos:
    stack: Stack
    seed: int
    http: httpx.AsyncClient
    load_end: float
    deadline: float
    jobs: dict[str, str] = field(default_factory=dict)  # id -> kind
    streams: list[StreamRun] = field(default_factory=list)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: list[str] = field(default_factory=list)
    batch: dict[str, Any] | None = None
    batch_notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def url(self, api: str) -> str:
        return self.stack.url_of(api)

    def loading(self) -> bool:
        return time.monotonic() < self.load_end

    def draining(self) -> bool:
        return time.monotonic() < self.deadline


def other(api: str) -> str:
    return APIS[1 - APIS.index(api)]


def error_code(resp: httpx.Response) -> str:
    try:
        err = resp.json()["error"]
        return str(err.get("code") or err.get("message", "")[:60])
    except (ValueError, KeyError, TypeError):
        return repr(resp.text[:60])


# -- clients ----------------------------------------------------------------------------


async def consume(resp: httpx.Response, run: StreamRun, stop_after_content: int | None = None) -> str:
    """Read SSE events into `run` until `[DONE]` ("done"), the connection ends ("eof"), or
    `stop_after_content` content events ("dropped")."""
    event_id: str | None = None
    data: list[str] = []
    content = 0
    stream_error: str | None = None  # an error event without id: the stream, not the job, broke
    async for line in resp.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            payload, eid = "\n".join(data), event_id
            event_id, data = None, []
            if payload == "[DONE]":
                if stream_error is not None:
                    run.interruptions.append(stream_error)
                    return "interrupted"
                if not run.finish_reasons and run.job_error is None:
                    run.anomalies.append("[DONE] without a finish_reason or an error event")
                run.done = True
                return "done"
            chunk = json.loads(payload)
            if eid is None and chunk.get("seq") is not None:
                eid = str(chunk["seq"])  # a create request's stream: `data:` lines, the seq in the JSON
            if eid is not None:
                seq = int(eid)
                if run.last_id is not None and seq <= run.last_id:
                    run.anomalies.append(f"event id {seq} after {run.last_id}")
                run.last_id = seq
            if "error" in chunk:
                if eid is not None:
                    run.job_error = chunk["error"]
                else:
                    err = chunk["error"]
                    stream_error = f"error event {err.get('code') or err.get('message', '')[:50]}"
                continue
            for c in chunk.get("choices", []):
                if c["index"] != 0:
                    continue
                if c["delta"].get("content"):
                    run.text.append(c["delta"]["content"])
                    content += 1
                if c.get("finish_reason"):
                    run.finish_reasons.append(c["finish_reason"])
            if stop_after_content is not None and content >= stop_after_content:
                return "dropped"
    run.interruptions.append("connection ended without [DONE]")
    return "eof"


async def follow_to_end(ctx: Chaos, run: StreamRun, api: str) -> None:
    """Resume `run` (on alternating APIs, after its last event id) until `[DONE]` or the deadline.
    (A connection cut after the job's last event but before `[DONE]` is resumed too: a
    replay from after the last event must end at once.)"""
    failures = 0
    while not run.done and ctx.draining():
        api = other(api)
        headers = {"Last-Event-ID": str(run.last_id)} if run.last_id is not None else {}
        try:
            async with (
                asyncio.timeout(max(0.1, ctx.deadline - time.monotonic())),
                ctx.http.stream(
                    "GET", f"{ctx.url(api)}/v1/chat/completions/{run.job_id}/stream", headers=headers
                ) as resp,
            ):
                if resp.status_code != 200:
                    await resp.aread()
                    run.interruptions.append(f"resume answered {resp.status_code}: {resp.text[:120]}")
                    failures += 1
                    await asyncio.sleep(min(2.0, 0.2 * failures))
                    continue
                run.connections += 1
                failures = 0
                await consume(resp, run)
        except TimeoutError:
            run.interruptions.append("deadline: still following at the deadline")
        except httpx.HTTPError as exc:
            run.interruptions.append(f"resume: {type(exc).__name__}")
            failures += 1
            await asyncio.sleep(min(2.0, 0.2 * failures))


async def streamer(ctx: Chaos, index: int) -> None:
    """Streaming requests, one after another; half of them background jobs (which this
    client sometimes leaves mid-answer on purpose), resumed on the other API when cut."""
    rng = random.Random(f"{ctx.seed}-stream-{index}")
    api = APIS[index % 2]
    n = 0
    while ctx.loading():
        n += 1
        background = rng.random() < 0.5
        body = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": f"chaos {ctx.seed} stream {index} #{n} " + "x " * rng.randint(0, 40)}
            ],
            "max_tokens": rng.randint(40, 400),
            "temperature": 0,
            "stream": True,
            "background": background,
        }
        drop = rng.randint(1, 30) if background and rng.random() < 0.3 else None
        api = other(api)
        run: StreamRun | None = None
        try:
            async with (
                asyncio.timeout(max(0.1, ctx.deadline - time.monotonic())),
                ctx.http.stream("POST", f"{ctx.url(api)}/v1/chat/completions", json=body) as resp,
            ):
                if resp.status_code != 200:
                    await resp.aread()
                    ctx.rejected[f"stream POST {resp.status_code} {error_code(resp)}"] += 1
                    await asyncio.sleep(0.3)
                    continue
                run = StreamRun(resp.headers["x-request-id"], background)
                ctx.jobs[run.job_id] = "stream-bg" if background else "stream"
                ctx.streams.append(run)
                run.connections += 1
                if await consume(resp, run, drop) == "dropped":
                    run.interruptions.append("client left on purpose")
        except (httpx.HTTPError, TimeoutError) as exc:
            if run is None:
                ctx.rejected[f"stream POST {type(exc).__name__}"] += 1
                await asyncio.sleep(0.3)
                continue
            if isinstance(exc, TimeoutError):
                run.interruptions.append("deadline: still following at the deadline")
            else:
                run.interruptions.append(f"first connection: {type(exc).__name__}")
        await follow_to_end(ctx, run, api)


async def poller(ctx: Chaos, index: int) -> None:
    """Background jobs, polled with GET until they end."""
    rng = random.Random(f"{ctx.seed}-poll-{index}")
    api = APIS[index % 2]
    n = 0
    while ctx.loading():
        n += 1
        body = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": f"chaos {ctx.seed} poll {index} #{n} " + "y " * rng.randint(0, 40)}
            ],
            "max_tokens": rng.randint(40, 400),
            "background": True,
        }
        api = other(api)
        try:
            resp = await ctx.http.post(f"{ctx.url(api)}/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            ctx.rejected[f"background POST {type(exc).__name__}"] += 1
            await asyncio.sleep(0.3)
            continue
        if resp.status_code != 200:
            ctx.rejected[f"background POST {resp.status_code} {error_code(resp)}"] += 1
            await asyncio.sleep(0.3)
            continue
        job_id = resp.json()["id"]
        ctx.jobs[job_id] = "background"
        while ctx.draining():
            api = other(api)
            await asyncio.sleep(0.3)
            try:
                got = await ctx.http.get(f"{ctx.url(api)}/v1/chat/completions/{job_id}")
            except httpx.HTTPError:
                continue
            if got.status_code == 200 and got.json().get("status") in TERMINAL:
                break


async def batch_client(ctx: Chaos) -> None:
    """One batch of BATCH_LINES lines through the Files and Batch APIs, polled to its end."""
    rng = random.Random(f"{ctx.seed}-batch")
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"chaos {ctx.seed} batch line {i}"}],
                "max_tokens": rng.randint(300, 1000),
            },
        }
        for i in range(BATCH_LINES)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    api = "api"
    batch_id = None
    while batch_id is None and ctx.loading():
        api = other(api)
        try:
            f = await ctx.http.post(
                f"{ctx.url(api)}/v1/files", files={"file": ("chaos.jsonl", data)}, data={"purpose": "batch"}
            )
            if f.status_code != 200:
                ctx.batch_notes.append(f"upload answered {f.status_code}")
                await asyncio.sleep(0.5)
                continue
            b = await ctx.http.post(
                f"{ctx.url(api)}/v1/batches",
                json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            )
            if b.status_code != 200:
                ctx.batch_notes.append(f"create answered {b.status_code}")
                await asyncio.sleep(0.5)
                continue
            batch_id = b.json()["id"]
        except httpx.HTTPError as exc:
            ctx.batch_notes.append(f"submit: {type(exc).__name__}")
            await asyncio.sleep(0.5)
    if batch_id is None:
        return
    ctx.batch = {"id": batch_id, "status": "unknown"}
    while ctx.draining():
        api = other(api)
        try:
            got = await ctx.http.get(f"{ctx.url(api)}/v1/batches/{batch_id}")
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
            continue
        if got.status_code == 200:
            ctx.batch = got.json()
            if ctx.batch["status"] in BATCH_TERMINAL:
                return
        await asyncio.sleep(1.0)


# -- faults -----------------------------------------------------------------------------


def fault_schedule(seed: int, count: int, seconds: float) -> list[tuple[float, str]]:
    rng = random.Random(f"{seed}-faults")
    kinds = ["kill_worker"] * 3 + ["restart_redis"] * 2 + ["restart_api"] * 2 + ["drop_redis_clients"] * 3
    times = sorted(rng.uniform(3.0, max(4.0, seconds - 4.0)) for _ in range(count))
    return [(t, rng.choice(kinds)) for t in times]


def inject_faults(ctx: Chaos, schedule: list[tuple[float, str]], stop: threading.Event) -> None:
    """Run the schedule (in a thread: the Stack's calls block)."""
    s = ctx.stack
    rng = random.Random(f"{ctx.seed}-fault-details")
    next_worker = 3
    for at, kind in schedule:
        if stop.wait(max(0.0, ctx.t0 + at - time.monotonic())):
            return
        t = time.monotonic() - ctx.t0
        try:
            if kind == "kill_worker":
                victim = rng.choice(s.running("w"))
                s.kill(victim)
                s.start_worker(f"w{next_worker}")
                detail = f"SIGKILL {victim}, started w{next_worker}"
                next_worker += 1
            elif kind == "restart_redis":
                sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
                s.restart("redis", sig)
                detail = f"{sig.name}"
            elif kind == "restart_api":
                name, sig = rng.choice(APIS), rng.choice([signal.SIGTERM, signal.SIGKILL])
                s.restart(name, sig)
                s._wait(lambda n=name: s.health(n) is not None, 60, f"{name} back")
                detail = f"{name} {sig.name}"
            else:
                r = redis_lib.Redis.from_url(s.redis_url, socket_timeout=5)
                try:
                    killed = [r.execute_command("CLIENT", "KILL", "TYPE", t) for t in ("normal", "pubsub")]
                finally:
                    r.close()
                detail = f"{killed[0]} normal, {killed[1]} pubsub"
        except Exception as exc:  # a fault that could not be applied is reported, not fatal
            detail = f"could not apply: {exc!r}"
        ctx.faults.append(f"{t:5.1f}s {kind}: {detail} (done at {time.monotonic() - ctx.t0:.1f}s)")


# -- checks -----------------------------------------------------------------------------


async def fetch_job(ctx: Chaos, job_id: str) -> tuple[int, dict[str, Any]]:
    """The job record as GET answers it, retried across APIs for a few seconds."""
    last: tuple[int, dict[str, Any]] = (0, {})
    for i in range(20):
        try:
            resp = await ctx.http.get(f"{ctx.url(APIS[i % 2])}/v1/chat/completions/{job_id}")
            last = (resp.status_code, resp.json())
            if resp.status_code in (200, 404):
                return last
        except (httpx.HTTPError, ValueError) as exc:
            last = (0, {"transport": repr(exc)})
        await asyncio.sleep(0.5)
    return last


async def check(ctx: Chaos) -> tuple[list[str], collections.Counter[str], collections.Counter[str]]:
    """Every invariant, on every job, stream and the batch: the violations (each marked with
    its kind), how many of each kind, and the jobs' final statuses."""
    violations: list[str] = []
    kinds: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()

    def bad(kind: str, message: str) -> None:
        kinds[kind] += 1
        violations.append(f"[{kind}] {message}")

    sem = asyncio.Semaphore(16)

    async def one(job_id: str) -> tuple[str, int, dict[str, Any]]:
        async with sem:
            code, body = await fetch_job(ctx, job_id)
            return job_id, code, body

    records: dict[str, dict[str, Any]] = {}
    for job_id, code, body in await asyncio.gather(*(one(j) for j in ctx.jobs)):
        kind = ctx.jobs[job_id]
        if code != 200:
            statuses[f"GET {code}"] += 1
            bad("job unreadable", f"{job_id} ({kind}): GET answered {code} {json.dumps(body)[:200]}")
            continue
        records[job_id] = body
        status = body.get("status")
        statuses[status] += 1
        if int(body.get("attempt") or 0) > 1:
            statuses["(ran more than one attempt)"] += 1
        if status not in TERMINAL:
            bad(
                "job not ended",
                f"{job_id} ({kind}): still {status} (attempt {body.get('attempt')}, error {body.get('error')})",
            )
        elif status == "completed":
            content = body["choices"][0]["message"]["content"]
            usage = body.get("usage") or {}
            want = expected_text(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            if content != want:
                bad(
                    "stored text wrong",
                    f"{job_id} ({kind}): stored text is not the fake engine's: {diff(content, want)}",
                )

    for run in ctx.streams:
        where = f"{run.job_id} ({'background ' if run.background else ''}stream, {run.connections} connections)"
        if not run.done:
            bad("stream never ended", f"{where}: never reached [DONE]; last interruptions {run.interruptions[-3:]}")
        for a in run.anomalies:
            bad("stream anomaly", f"{where}: {a}")
        body = records.get(run.job_id)
        if body is None:
            continue
        status = body.get("status")
        text = "".join(run.text)
        if status == "completed":
            content = body["choices"][0]["message"]["content"]
            if run.job_error is not None:
                bad("stream/status mismatch", f"{where}: completed, but its stream ended with error {run.job_error}")
            elif run.done and text != content:
                bad(
                    "stream text != stored",
                    f"{where}: streamed text differs from the stored result: {diff(text, content)}",
                )
        elif status == "failed" and run.done and run.job_error is None:
            bad(
                "stream/status mismatch",
                f"{where}: failed ({body.get('error')}), but its stream ended without an error event",
            )

    b = ctx.batch
    if b is None:
        bad("batch", f"batch: never created ({ctx.batch_notes[-3:]})")
    elif b.get("status") not in BATCH_TERMINAL:
        bad("batch not ended", f"batch {b['id']}: still {b.get('status')} {b.get('request_counts')}")
    else:
        counts = b["request_counts"]
        if counts["completed"] + counts["failed"] != counts["total"] or counts["total"] != BATCH_LINES:
            bad("batch counts", f"batch {b['id']}: {b['status']} with request_counts {counts}")
        out: list[dict[str, Any]] = []
        if b.get("output_file_id"):
            resp = await ctx.http.get(f"{ctx.url('api')}/v1/files/{b['output_file_id']}/content")
            out = [json.loads(x) for x in resp.text.splitlines() if x.strip()]
        if len(out) != counts["completed"] or len({o["custom_id"] for o in out}) != len(out):
            bad("batch output", f"batch {b['id']}: {len(out)} output lines for {counts['completed']} completed")
        for o in out:
            body = o["response"]["body"]
            usage = body["usage"]
            content = body["choices"][0]["message"]["content"]
            if content != expected_text(usage["prompt_tokens"], usage["completion_tokens"]):
                bad("batch output", f"batch {b['id']} {o['custom_id']}: output text is not the fake engine's")
    return violations, kinds, statuses


def diff(got: str, want: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return f"{len(got)} vs {len(want)} chars, first difference at {i}: {got[i : i + 40]!r} vs {want[i : i + 40]!r}"


# -- the test ---------------------------------------------------------------------------


def live_workers(s: Stack) -> int:
    r = redis_lib.Redis.from_url(s.redis_url)
    try:
        return int(r.zcount("llmq:workers", time.time() - 4, "+inf"))
    finally:
        r.close()


def restore(s: Stack) -> list[str]:
    """After the faults: both APIs and two workers up again (a fault may have left one down);
    what could not be brought back."""
    problems = []
    for name in APIS:
        if name not in s.running(name):
            s.start_api(name)
    for i in range(len(s.running("w")), 2):
        s.start_worker(f"w-end{i}")
    for name in APIS:
        try:
            s._wait(lambda n=name: MODEL in (s.health(n) or {}).get("ready_models", []), 60, f"{name} ready")
        except TimeoutError as exc:
            problems.append(f"[not ready after the faults] {exc}")
    return problems


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos(seed: int, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        redis_persist=True,
        env={**ENV, "FILES_DIR": str(tmp_path / "files"), "BATCH_MAX_LINES": str(BATCH_LINES)},
    )
    started = time.monotonic()
    stop = threading.Event()
    fault_thread: threading.Thread | None = None
    clients: list[asyncio.Task[None]] = []
    try:
        s.start_redis()
        s.start_worker("w1")
        s.start_worker("w2")
        for name in APIS:
            s.start_api(name)
        for name in APIS:
            s.wait_ready(MODEL, timeout=120, api=name)
        s._wait(lambda: live_workers(s) >= 2, 60, "two live workers")

        schedule = fault_schedule(seed, FAULTS, LOAD_SECONDS)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        timeout = httpx.Timeout(15.0, connect=3.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            now = time.monotonic()
            end = now + LOAD_SECONDS
            ctx = Chaos(s, seed, http, load_end=end, deadline=end + DRAIN_SECONDS, t0=now)
            fault_thread = threading.Thread(target=inject_faults, args=(ctx, schedule, stop), daemon=True)
            fault_thread.start()
            clients = [
                *(asyncio.create_task(streamer(ctx, i)) for i in range(STREAMERS)),
                *(asyncio.create_task(poller(ctx, i)) for i in range(POLLERS)),
                asyncio.create_task(batch_client(ctx)),
            ]
            await asyncio.sleep(LOAD_SECONDS)
            stop.set()
            await asyncio.to_thread(fault_thread.join)
            problems = await asyncio.to_thread(restore, s)
            faults_over = time.monotonic() - ctx.t0
            await asyncio.gather(*clients)
            drained = time.monotonic() - ctx.t0
            violations, violation_kinds, statuses = await check(ctx)
            for p in s.procs:
                if p.popen.poll() is not None and not getattr(p, "expected_exit", False):
                    problems.append(f"[process died] {p.name} exited by itself with {p.popen.returncode}")
            for problem in problems:
                violation_kinds[problem[1 : problem.index("]")]] += 1
            violations += problems
    finally:
        # Never leave the fault thread starting processes on a stack being stopped.
        stop.set()
        if fault_thread is not None:
            fault_thread.join()
        for task in clients:
            task.cancel()
        s.stop()

    resumed = [r for r in ctx.streams if r.connections > 1 or r.interruptions]
    kinds = collections.Counter(ctx.jobs.values())
    reasons = collections.Counter(i.split(":")[0] for r in ctx.streams for i in r.interruptions)
    print(
        f"\nchaos seed {seed}: {len(ctx.jobs)} jobs {dict(kinds)}, statuses {dict(statuses)}\n"
        f"  {len(ctx.faults)} faults (load {LOAD_SECONDS:.0f} s, faults over at {faults_over:.1f} s, "
        f"clients done at {drained:.1f} s, total {time.monotonic() - started:.1f} s):\n    "
        + "\n    ".join(ctx.faults)
        + f"\n  streams: {len(ctx.streams)}, {len(resumed)} interrupted, "
        f"{sum(max(0, r.connections - 1) for r in ctx.streams)} resumes; interruptions {dict(reasons)}\n"
        f"  rejected requests: {dict(ctx.rejected)}\n"
        f"  batch: {(ctx.batch or {}).get('status')} {(ctx.batch or {}).get('request_counts')}\n"
        f"  logs: {logs}\n"
        f"  {len(violations)} violations {dict(violation_kinds)}" + "".join(f"\n    {v}" for v in violations[:60])
    )
    assert not violations, f"{len(violations)} invariant violations (seed {seed}): {dict(violation_kinds)}"
