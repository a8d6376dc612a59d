"""Scaling across hosts: streaming jobs/s end to end through the API with 1 to 4 worker
hosts, each a network namespace reaching Redis over its own veth link (scripts/hosts.py).

Every worker runs the fake engine with `--slots` slots and `--step` seconds a step (8
tokens a step), so one worker finishes at most slots / (tokens / 8 x step) jobs a second
and is the limit at one host. Streaming clients (httpx, SSE, closed loop) keep
`--load` x the live slots busy (more than the slots, so a worker never waits for the next
request's round trip). Hosts join one at a time, with no API restart, and each level is
measured for `--seconds` after `--warmup`. Printed per level: jobs/s, the ratio to
1-host x N (target at least 0.9), what the workers could do at most, and the CPU each
part used (one core = 100 %) beside other programs' and the machine's, so a level held
below its workers' maximum names its limit: the API, Redis, the client, or the cores.

Needs root (network namespaces). Figures are noisy on a shared machine: compare within
one run.

    python bench/bench_hosts.py [--hosts 1,2,3,4] [--slots 8] [--step 0.1] [--tokens 64]
                                [--load 1.5] [--seconds 12] [--warmup 3] [--api-processes 1]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from hosts import HostNet, HostStack, namespaces_supported  # noqa: E402
from stack import free_port, group_pids  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TOKENS_PER_STEP = 8  # the fake engine's
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat), all cores."""
    cols = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cols[3] + cols[4]
    return (sum(cols) - idle) / CLK_TCK, sum(cols) / CLK_TCK


@dataclass
class Level:
    hosts: int
    jobs: int = 0
    errors: int = 0
    seconds: float = 0.0
    tokens: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # part -> % of one core

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


class Load:
    """Closed-loop streaming clients; counts the jobs that end inside the measuring window."""

    def __init__(self, http: Any, model: str, tokens: int):
        self.http = http
        self.model = model
        self.tokens = tokens
        self.window: Level | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def one(self) -> tuple[bool, int]:
        body = {
            "model": self.model,
            "messages": PROMPT,
            "max_tokens": self.tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        chunks = 0
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return False, 0
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    return True, chunks
                if line.startswith("data:"):
                    if '"error"' in line:
                        return False, chunks
                    chunks += 1
        return False, chunks

    async def client(self) -> None:
        while True:
            try:
                ok, _ = await self.one()
            except Exception:  # a broken connection counts as an error, the client goes on
                ok = False
                await asyncio.sleep(0.1)
            level = self.window
            if level is not None:
                if ok:
                    level.jobs += 1
                    level.tokens += self.tokens
                else:
                    level.errors += 1

    def grow(self, clients: int) -> None:
        while len(self.tasks) < clients:
            self.tasks.append(asyncio.create_task(self.client()))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def live_workers(stack: HostStack) -> int:
    import redis

    with redis.Redis.from_url(stack.redis_url) as r:
        ids = r.zrangebyscore("llmq:workers", time.time() - 15, "+inf")
        return sum(1 for i in ids if r.exists(f"llmq:worker:{i.decode()}"))


async def measure(stack: HostStack, load: Load, level: Level, seconds: float, workers: list[int]) -> None:
    groups = {
        "api": stack.api_pids(),
        "redis": [stack.proc("redis").popen.pid],
        "workers": [pid for w in workers for pid in [w, *group_pids(w)]],
        "client": [os.getpid()],
    }
    before = {k: cpu_seconds(v) for k, v in groups.items()}
    busy0, total0 = machine_busy()
    t0 = time.monotonic()
    load.window = level
    await asyncio.sleep(seconds)
    load.window = None
    level.seconds = time.monotonic() - t0
    busy1, total1 = machine_busy()
    for k, v in groups.items():
        level.cpu[k] = 100 * (cpu_seconds(v) - before[k]) / level.seconds
    level.cpu["workers_each"] = level.cpu["workers"] / max(1, len(workers))
    # The whole machine (other programs included), in cores' worth: 100 % = one core.
    cores = os.cpu_count() or 1
    level.cpu["machine"] = 100 * cores * (busy1 - busy0) / max(1e-9, total1 - total0)


def limit_of(level: Level, cores: int, api_processes: int) -> str:
    """What most likely holds a level back: a part near all the cores it can use (Redis
    and the client: one; the API: one a process), else the machine's cores."""
    c = level.cpu
    for part, usable in (("api", api_processes), ("redis", 1), ("client", 1)):
        if c.get(part, 0) >= 85 * usable:
            return f"{part} CPU ({c[part]:.0f} % of {usable * 100} %)"
    if c.get("machine", 0) >= 90 * cores:
        return f"machine cores ({c['machine']:.0f} % of {cores * 100} %)"
    return "none seen"


def table(levels: list[Level], args: argparse.Namespace) -> str:
    job_s = args.tokens / TOKENS_PER_STEP * args.step
    per_worker = args.slots / job_s
    base = levels[0].jobs_per_s if levels else 0.0
    cores = os.cpu_count() or 1
    rows = [
        f"fake engine: {args.slots} slots a worker, {args.tokens} tokens a job, {args.step} s a step of "
        f"{TOKENS_PER_STEP} tokens -> {job_s:.2f} s a job, at most {per_worker:.1f} jobs/s a worker; "
        f"clients = {args.load} x live slots; {args.seconds:.0f} s a level; API processes: {args.api_processes}",
        "",
        "| hosts | jobs/s | / (1 host x N) | workers' max | errors | CPU % API | Redis | workers (each) | client "
        "| other programs | machine | limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        ratio = lv.jobs_per_s / (base * lv.hosts) if base else 0.0
        c = lv.cpu
        ours = c["api"] + c["redis"] + c["workers"] + c["client"]
        # Below the workers' maximum something else holds the level back: name it.
        held = lv.jobs_per_s < 0.9 * per_worker * lv.hosts
        rows.append(
            f"| {lv.hosts} | {lv.jobs_per_s:.1f} | {ratio:.2f} | {per_worker * lv.hosts:.1f} | {lv.errors} "
            f"| {c['api']:.0f} | {c['redis']:.0f} | {c['workers']:.0f} ({c['workers_each']:.0f}) | {c['client']:.0f} "
            f"| {max(0.0, c['machine'] - ours):.0f} | {c['machine']:.0f} / {cores * 100} "
            f"| {limit_of(lv, cores, args.api_processes) if held else 'the workers (as meant)'} |"
        )
    if levels and levels[0].jobs_per_s < 0.9 * per_worker:
        rows.append(
            "\nnote: 1 host did not reach its workers' maximum, so the ratios are not against a worker-bound "
            "baseline; use fewer slots or longer steps (or a quieter machine)."
        )
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> list[Level]:
    import httpx

    from common.settings import get_settings

    model = get_settings().model_name
    levels = sorted({int(h) for h in args.hosts.split(",")})
    net = HostNet.create()
    logs = Path(args.logs) if args.logs else ROOT / "var" / "bench-hosts"
    stack = HostStack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        net=net,
        api_processes=args.api_processes,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": str(args.step),
            "WORKER_SLOTS": str(args.slots),
            "LOG_LEVEL": "WARNING",
            # Room for every client's job: admission must not refuse the load it measures.
            "MAX_QUEUED_JOBS": "100000",
        },
    )
    out: list[Level] = []
    try:
        stack.start_redis()
        stack.start_api()
        workers: list[int] = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=120, limits=limits) as http:
            load = Load(http, model, args.tokens)
            try:
                for n in range(1, max(levels) + 1):
                    host = net.add_host()
                    workers.append(net.start_worker(stack, host, f"w{n}").popen.pid)
                    deadline = time.monotonic() + 120
                    while live_workers(stack) < n:
                        stack.check_alive()
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{n} workers not live")
                        await asyncio.sleep(0.3)
                    if n == 1:
                        stack.wait_ready(model, timeout=60)
                    load.grow(max(1, round(args.load * args.slots * n)))
                    if n not in levels:
                        continue
                    await asyncio.sleep(args.warmup)
                    level = Level(hosts=n)
                    await measure(stack, load, level, args.seconds, workers)
                    out.append(level)
                    print(
                        f"{n} host(s): {level.jobs_per_s:.1f} jobs/s, {level.errors} errors, "
                        f"CPU % {json.dumps({k: round(v) for k, v in level.cpu.items()})}",
                        flush=True,
                    )
            finally:
                await load.stop()
    finally:
        net.close(stack)
        stack.stop()
        left = net.leftovers()
        if left:
            print(f"warning: left behind: {left}", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="jobs/s with 1 to N worker hosts (network namespaces), fake engine")
    p.add_argument("--hosts", default="1,2,3,4", help="host counts to measure, e.g. 1,2,3,4")
    p.add_argument("--slots", type=int, default=8, help="WORKER_SLOTS of each worker")
    p.add_argument("--step", type=float, default=0.1, help="FAKE_STEP_SECONDS")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each job (8 a step)")
    p.add_argument("--load", type=float, default=1.5, help="streaming clients per live slot")
    p.add_argument("--seconds", type=float, default=12, help="measuring window a level")
    p.add_argument("--warmup", type=float, default=3, help="seconds before each window")
    p.add_argument("--api-processes", type=int, default=1, help="API_PROCESSES of the API")
    p.add_argument("--logs", default=None, help="where the processes' logs go (default var/bench-hosts)")
    p.add_argument("--json", default=None, help="also write the levels here")
    args = p.parse_args()
    refused = namespaces_supported()
    if refused:
        print(f"cannot make network namespaces: {refused}", file=sys.stderr)
        return 2
    levels = asyncio.run(run(args))
    print()
    print(table(levels, args))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(lv) | {"jobs_per_s": lv.jobs_per_s} for lv in levels], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
