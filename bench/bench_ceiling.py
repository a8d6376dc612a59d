"""The streaming orchestration ceiling (fake engine), next to Celery's own no-op task rate.

One run, one stack (Redis, one worker with ENGINE=fake and FAKE_STEP_SECONDS=0, one API
process), and a second Celery worker process with the same settings as the model worker
(thread pool of WORKER_SLOTS, prefetch 1, late acks, task events, llmq's broker
transport) that runs a no-op task:

1. Celery's no-op rate: `--noop-tasks` tasks sent with `send_task` (as the API sends a
   job) from a few threads; each task only INCRs a Redis counter (no result backend: the
   bench polls the counter). Rate = tasks / (first send .. counter reaches the total).
   Measured twice: with kombu's own Redis transport (Celery as it comes) and with llmq's
   (common/broker.py: one Redis client per channel, several messages a BRPOP), which the
   API and the workers use; the streaming rate is compared with both.
2. Streaming jobs end to end: closed-loop SSE clients (aiohttp), each posting a streaming
   `/v1/chat/completions` and reading it to `[DONE]`, at each `--streams` level with
   `--tokens` tokens a job (jobs/s), and a token-heavy run (`--heavy-tokens` a job at
   `--heavy-streams`) for relayed tokens/s. A relayed token is one fake token (" t<p>")
   in a chunk's content as the client read it.

For every run it prints the CPU seconds each process used per second of wall time (API,
worker, Redis, this client) and Redis's busiest commands (INFO commandstats), so the
ceiling has an address. Ratios against the targets of issue 12: jobs/s at least 0.5x the
no-op rate, relayed tokens/s at least 50,000.

    python bench/bench_ceiling.py [--streams 64,256] [--tokens 64] [--heavy-tokens 1024]
        [--heavy-streams 64] [--seconds 10] [--noop-tasks 5000] [--slots 512] [--json out.json]

The module is also the no-op worker's Celery app (`celery -A bench.bench_ceiling worker`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from celery import Celery  # noqa: E402

from common import keys  # noqa: E402
from common.settings import get_settings  # noqa: E402

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
NOOP_COUNTER = keys.PREFIX + "bench:noop:done"
JOB_TARGET_RATIO = 0.5
TOKENS_TARGET = 50_000

# -- the no-op worker's Celery app: the model worker's settings (worker/celery_app.py) ----

_settings = get_settings()
_redis_url = _settings.redis_url
# BENCH_NOOP_TRANSPORT: "kombu" for kombu's own Redis transport, else llmq's.
NOOP_TRANSPORTS = {"kombu": "redis", "llmq": "common.broker:Transport"}
app = Celery("llmq-bench-noop", broker=_redis_url)
app.conf.update(
    broker_transport=NOOP_TRANSPORTS[os.environ.get("BENCH_NOOP_TRANSPORT", "llmq")],
    worker_pool="threads",
    worker_concurrency=_settings.worker_slots,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    accept_content=["json"],
    task_serializer="json",
    event_serializer="json",
    task_default_queue=NOOP_QUEUE,
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options=keys.broker_transport_options(_settings.broker_visibility_timeout),
    worker_hijack_root_logger=False,
)
_counter: Any = None


@app.task(name=NOOP_TASK)
def noop() -> None:
    """Nothing but counting itself done (the bench reads the counter, not a result)."""
    global _counter
    if _counter is None:
        import redis

        _counter = redis.Redis.from_url(_redis_url)
    _counter.incr(NOOP_COUNTER)


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Usage:
    """CPU seconds per wall second of each process during a run, and Redis's top commands."""

    cpu: dict[str, float] = field(default_factory=dict)
    commands: list[tuple[str, int, float]] = field(default_factory=list)  # name, calls, usec per call


@dataclass
class RunResult:
    name: str
    streams: int
    tokens_per_job: int
    jobs: int
    tokens: int
    seconds: float
    errors: int
    usage: Usage

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a service: every live process in its process
    group (the Stack starts each in its own session; several API processes are children
    of the one it started), all threads."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Meter:
    """CPU of the stack's processes (and this one) and Redis commandstats over a window."""

    def __init__(self, pids: dict[str, int], redis_url: str):
        import redis

        self.pids = pids
        self.redis = redis.Redis.from_url(redis_url)

    def start(self) -> None:
        self.redis.config_resetstat()
        self.t0 = time.monotonic()
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.self0 = time.process_time()

    def stop(self) -> Usage:
        wall = time.monotonic() - self.t0
        cpu = {n: (cpu_seconds(p) - self.cpu0[n]) / wall for n, p in self.pids.items()}
        cpu["client"] = (time.process_time() - self.self0) / wall
        stats = self.redis.info("commandstats")
        commands = sorted(
            ((k.removeprefix("cmdstat_"), int(v["calls"]), float(v["usec_per_call"])) for k, v in stats.items()),
            key=lambda c: -c[1] * c[2],
        )
        return Usage(cpu, commands[:6])


def run_noop(stack: Any, meter: Meter, tasks: int, transport: str, threads: int = 4) -> RunResult:
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    r.delete(NOOP_COUNTER)
    producer = Celery("llmq-bench-producer", broker=stack.redis_url)
    # As the API's JobQueue sends a job (common/job_queue.py), on the worker's transport.
    producer.conf.update(
        broker_transport=NOOP_TRANSPORTS[transport],
        task_send_sent_event=True,
        task_ignore_result=True,
        accept_content=["json"],
        task_serializer="json",
        event_serializer="json",
        broker_transport_options=keys.broker_transport_options(_settings.broker_visibility_timeout),
    )
    # Connections warmed up first (not part of the rate).
    producer.send_task(NOOP_TASK, queue=NOOP_QUEUE)
    while int(r.get(NOOP_COUNTER) or 0) < 1:
        time.sleep(0.01)
    r.delete(NOOP_COUNTER)

    def send(n: int) -> None:
        for _ in range(n):
            producer.send_task(NOOP_TASK, queue=NOOP_QUEUE)

    meter.start()
    t0 = time.monotonic()
    workers = [threading.Thread(target=send, args=(tasks // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    total = (tasks // threads) * threads
    sent_at = 0.0
    while True:
        done = int(r.get(NOOP_COUNTER) or 0)
        if not sent_at and not any(w.is_alive() for w in workers):
            sent_at = time.monotonic() - t0
        if done >= total:
            break
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    usage = meter.stop()
    print(f"  (sent in {sent_at:.2f} s: {total / max(sent_at, 1e-9):.0f} sends/s)", flush=True)
    producer.close()
    return RunResult(f"no-op ({transport})", threads, 0, total, 0, seconds, 0, usage)


async def run_streams(
    url: str, model: str, streams: int, tokens: int, seconds: float, warmup: float, meter: Meter, name: str
) -> RunResult:
    import aiohttp

    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Count."}],
            "max_tokens": tokens,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    headers = {"content-type": "application/json"}
    state = {"measuring": False, "stop": False}
    counts = {"jobs": 0, "tokens": 0, "errors": 0}

    async def user(session: aiohttp.ClientSession) -> None:
        while not state["stop"]:
            got = 0
            ok = False
            try:
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                    else:
                        tail = b""
                        async for chunk in resp.content.iter_any():
                            # Fake tokens read " t<position>"; the JSON has no other " t".
                            got += chunk.count(b" t")
                            tail = (tail + chunk)[-64:]
                        ok = tail.rstrip().endswith(b"data: [DONE]") and got == tokens
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if state["measuring"]:
                if ok:
                    counts["jobs"] += 1
                    counts["tokens"] += got
                else:
                    counts["errors"] += 1
            if not ok:
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        users = [asyncio.create_task(user(session)) for _ in range(streams)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        meter.start()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        # Jobs count when they end inside the window (closed loop: the rate in steady state).
        state["measuring"] = False
        elapsed = time.monotonic() - t0
        usage = meter.stop()
        state["stop"] = True
        await asyncio.gather(*users, return_exceptions=True)
    return RunResult(name, streams, tokens, counts["jobs"], counts["tokens"], elapsed, counts["errors"], usage)


def show(result: RunResult) -> None:
    # CPU per job: steadier than the rates on a machine shared with other work.
    per_job = 1000 / result.jobs_per_s if result.jobs else 0.0
    cpu = ", ".join(f"{n} {v:.2f} ({v * per_job:.2f} ms/job)" for n, v in result.usage.cpu.items())
    top = ", ".join(f"{n} {c} x {u:.1f}us" for n, c, u in result.usage.commands)
    print(
        f"{result.name:>16} | streams {result.streams:>4} | {result.tokens_per_job:>5} tok/job | "
        f"{result.jobs_per_s:8.1f} jobs/s | {result.tokens_per_s:9.0f} tok/s | errors {result.errors}",
        flush=True,
    )
    print(f"{'':>16}   CPU s/s: {cpu}", flush=True)
    if result.jobs:
        total = sum(result.usage.cpu.values()) * per_job
        cores = os.cpu_count() or 1
        print(
            f"{'':>16}   CPU per job, all processes: {total:.2f} ms: at most {cores * 1000 / total:.0f} jobs/s "
            f"on {cores} cores if CPU were the only limit",
            flush=True,
        )
    print(f"{'':>16}   redis: {top}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="64,256")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--heavy-tokens", type=int, default=1024)
    parser.add_argument("--heavy-streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--noop-tasks", type=int, default=5000)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--skip-noop", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from stack import Stack, free_port

    model = get_settings().model_name
    logs = Path(tempfile.mkdtemp(prefix="llmq-bench-ceiling-"))
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0",
            "WORKER_SLOTS": str(args.slots),
            "MAX_QUEUED_JOBS": "100000",
        },
    )
    results: list[RunResult] = []
    try:
        stack.start_redis()
        worker = stack.start_worker()
        api = stack.start_api()
        stack.wait_ready(model, timeout=600)
        redis_pid = next(p.popen.pid for p in stack.procs if p.name == "redis")
        print(f"logs: {logs}", flush=True)

        for transport in () if args.skip_noop else ("kombu", "llmq"):
            noop_worker = stack.spawn(
                f"noop-worker-{transport}",
                [
                    stack.python,
                    "-m",
                    "celery",
                    "-A",
                    "bench.bench_ceiling",
                    "worker",
                    "-n",
                    f"noop-{transport}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "-Q",
                    NOOP_QUEUE,
                ],
                env=stack._env() | {"BENCH_NOOP_TRANSPORT": transport},
            )
            meter = Meter({"noop-worker": noop_worker.popen.pid, "redis": redis_pid}, stack.redis_url)
            noop_result = run_noop(stack, meter, args.noop_tasks, transport)
            results.append(noop_result)
            show(noop_result)
            # Idle from here on: stopped so it costs nothing.
            stack.stop_proc(noop_worker)
        meter = Meter({"api": api.popen.pid, "worker": worker.popen.pid, "redis": redis_pid}, stack.redis_url)
        runs = [(f"stream {args.tokens}", int(s), args.tokens) for s in args.streams.split(",") if s]
        if args.heavy_tokens:
            runs.append((f"stream {args.heavy_tokens}", args.heavy_streams, args.heavy_tokens))
        for name, streams, tokens in runs:
            result = asyncio.run(
                run_streams(stack.api_url, model, streams, tokens, args.seconds, args.warmup, meter, name)
            )
            results.append(result)
            show(result)
    finally:
        stack.stop()

    noop_rates = {r.name: r.jobs_per_s for r in results if r.name.startswith("no-op")}
    print("\nAgainst the targets (issue 12):")
    for r in results:
        if r.name.startswith("no-op"):
            continue
        parts = [f"{r.name} x {r.streams}: {r.jobs_per_s:.1f} jobs/s"]
        for name, rate in noop_rates.items():
            parts.append(f"{r.jobs_per_s / rate:.2f}x the {name} rate {rate:.0f}/s (target {JOB_TARGET_RATIO}x)")
        parts.append(f"{r.tokens_per_s:.0f} tok/s = {r.tokens_per_s / TOKENS_TARGET:.2f}x of {TOKENS_TARGET}")
        print("  " + "; ".join(parts))
    if args.json is not None:
        args.json.write_text(
            json.dumps([asdict(r) | {"jobs_per_s": r.jobs_per_s, "tokens_per_s": r.tokens_per_s} for r in results])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
