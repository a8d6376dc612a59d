"""The streaming ceiling with the API as 1, 2 and 4 processes (API_PROCESSES), fake engine.

    python bench/bench_api_scale.py [--processes 1,2,4] [--streams 64] [--seconds 10]

One Redis and one fake-engine worker (FAKE_STEP_SECONDS=0, enough slots for every stream)
serve all levels; each level starts the API with that many processes on its own port,
drives it with closed-loop streaming clients (aiohttp, one process: this one; 64 tokens
a job, usage from the last chunk) for `--seconds` after a short warm-up, then stops it.
For each level it prints jobs/s, relayed tokens/s, and the CPU each part used over the
run (cores busy: the API's processes summed and its busiest one, the worker, Redis from
INFO cpu, this client, other programs on the machine), and names the limit: Redis when
its one thread is near a core, the API when its processes are (each near a core), else
the machine's cores when all of them together are near the machine's core count.

Figures, not assertions, from a machine whose other work shows in the `others` column.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from stack import Stack, free_port, group_pids  # noqa: E402

sys.path.insert(0, str(ROOT))
from common.settings import get_settings  # noqa: E402

MODEL = get_settings().model_name
TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
# A part is "the limit" when it is busy at least this share of what it can use.
BUSY = 0.85


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, ours or not)."""
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:]]
    idle = cols[3] + cols[4]
    return (sum(cols[:8]) - idle) / TICKS


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def client_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@dataclass
class Level:
    processes: int
    jobs: int = 0
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    api_cores: float = 0.0
    api_busiest: float = 0.0
    worker_cores: float = 0.0
    redis_cores: float = 0.0
    client_cores: float = 0.0
    machine_cores: float = 0.0

    @property
    def ours(self) -> float:
        return self.api_cores + self.worker_cores + self.redis_cores + self.client_cores

    @property
    def others(self) -> float:
        """Cores busy with programs not part of this run (a shared machine)."""
        return max(0.0, self.machine_cores - self.ours)

    def ms_per_job(self, cores: float) -> float:
        return 1000 * cores * self.seconds / self.jobs if self.jobs else 0.0

    @property
    def quiet_ceiling(self) -> float:
        """Jobs/s this machine's cores would allow if only this run used them (its CPU per job)."""
        per_job = self.ms_per_job(self.ours)
        return 1000 * CORES / per_job if per_job else 0.0

    @property
    def limit(self) -> str:
        if self.redis_cores >= BUSY:
            return "Redis (one thread, near a core)"
        if self.api_busiest >= BUSY and self.api_cores >= BUSY * self.processes:
            return "the API (every process near a core)"
        if self.machine_cores >= BUSY * CORES:
            shared = f"; {self.others:.2f} of them other programs'" if self.others >= 0.25 else ""
            return f"the machine's {CORES} cores (all near busy{shared})"
        return "none of these near busy (client, latency or the worker)"


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """One streamed job to its end; its completion tokens (from the usage chunk)."""
    tokens = 0
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            await resp.read()
            raise RuntimeError(f"HTTP {resp.status}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            if b'"usage":{' in data:
                usage = json.loads(data).get("usage") or {}
                tokens = int(usage.get("completion_tokens") or 0)
    return tokens


async def drive(port: int, streams: int, warmup: float, seconds: float, tokens: int) -> tuple[int, int, int, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    counting = False
    jobs = toks = errors = 0
    stop = time.monotonic() + warmup + seconds

    async def loop(session: aiohttp.ClientSession) -> None:
        nonlocal jobs, toks, errors
        while time.monotonic() < stop:
            try:
                n = await one_stream(session, url, body)
            except (TimeoutError, aiohttp.ClientError, RuntimeError):
                if counting:
                    errors += 1
                await asyncio.sleep(0.05)
                continue
            if counting:
                jobs += 1
                toks += n

    connector = aiohttp.TCPConnector(limit=streams + 8)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(loop(session)) for _ in range(streams)]
        await asyncio.sleep(warmup)
        counting = True
        start = time.monotonic()
        await asyncio.sleep(seconds)
        counting = False
        took = time.monotonic() - start
        await asyncio.gather(*tasks)
    return jobs, toks, errors, took


def run_level(stack: Stack, r: redis.Redis, processes: int, args: argparse.Namespace) -> Level:
    name = f"api{processes}"
    stack.start_api(name, processes=processes)
    stack.wait_ready(MODEL, timeout=120, api=name)
    port = stack.api_ports[name]
    api_group = stack.api_pids(name, serving=False)
    serving = stack.api_pids(name)
    worker = stack.proc("worker1").popen.pid
    level = Level(processes)
    # CPU over the counted window only (the warm-up runs first, inside drive()): sampled
    # at the window's edges by callbacks on the client's event loop.
    samples: dict[str, dict[str, float]] = {}

    def sample(label: str) -> None:
        samples[label] = {
            "api": sum(cpu_seconds(p) for p in api_group),
            **{f"api{p}": cpu_seconds(p) for p in serving},
            "worker": sum(cpu_seconds(p) for p in group_pids(worker)),
            "redis": redis_cpu(r),
            "client": client_cpu(),
            "machine": machine_busy(),
            "t": time.monotonic(),
        }

    async def measured() -> tuple[int, int, int, float]:
        loop = asyncio.get_running_loop()
        loop.call_later(args.warmup, sample, "start")
        loop.call_later(args.warmup + args.seconds, sample, "end")
        return await drive(port, args.streams, args.warmup, args.seconds, args.tokens)

    try:
        level.jobs, level.tokens, level.errors, level.seconds = asyncio.run(measured())
    finally:
        stack.stop_proc(stack.proc(name))
    a, b = samples["start"], samples["end"]
    wall = b["t"] - a["t"]
    level.api_cores = (b["api"] - a["api"]) / wall
    level.api_busiest = max((b[f"api{p}"] - a[f"api{p}"]) / wall for p in serving)
    level.worker_cores = (b["worker"] - a["worker"]) / wall
    level.redis_cores = (b["redis"] - a["redis"]) / wall
    level.client_cores = (b["client"] - a["client"]) / wall
    level.machine_cores = (b["machine"] - a["machine"]) / wall
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="API process counts, comma-separated")
    parser.add_argument("--streams", type=int, default=64, help="concurrent closed-loop streams")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a job")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--log-dir", type=Path, default=ROOT / "var" / "bench-api-scale-logs")
    args = parser.parse_args()
    levels = [int(x) for x in args.processes.split(",")]
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=args.log_dir,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0",
            "WORKER_SLOTS": str(max(64, args.streams * 2)),
            "MAX_QUEUED_JOBS": str(args.streams * 4),
            "LOG_LEVEL": "WARNING",
        },
    )
    results: list[Level] = []
    try:
        stack.start_redis()
        stack.start_worker()
        r = redis.Redis.from_url(stack.redis_url)
        for n in levels:
            print(f"API with {n} process(es): {args.streams} streams x {args.tokens} tokens ...", flush=True)
            results.append(run_level(stack, r, n, args))
    finally:
        stack.stop()
    print(f"\nfake engine, {args.streams} closed-loop streams, {args.tokens} tokens a job, {CORES} cores")
    print(
        f"{'API procs':>9} {'jobs/s':>8} {'tokens/s':>9} {'errors':>6} | cores busy: {'API':>5} "
        f"{'(max 1)':>7} {'worker':>6} {'Redis':>5} {'client':>6} {'others':>6} {'machine':>7} | limit"
    )
    base = results[0].jobs / results[0].seconds if results and results[0].jobs else 0.0
    for lv in results:
        rate = lv.jobs / lv.seconds
        print(
            f"{lv.processes:>9} {rate:>8.1f} {lv.tokens / lv.seconds:>9.0f} {lv.errors:>6} | {'':>11}"
            f"{lv.api_cores:>5.2f} {lv.api_busiest:>7.2f} {lv.worker_cores:>6.2f} {lv.redis_cores:>5.2f} "
            f"{lv.client_cores:>6.2f} {lv.others:>6.2f} {lv.machine_cores:>7.2f} | {lv.limit}"
            + (f" (x{rate / base:.2f} of 1 process)" if base and lv is not results[0] else "")
        )
    print(f"\nCPU per job (ms; steadier than the rates on a shared machine) and what {CORES} cores would allow:")
    print(f"{'API procs':>9} {'API':>6} {'worker':>6} {'Redis':>6} {'client':>6} {'all':>6} | jobs/s if alone")
    for lv in results:
        print(
            f"{lv.processes:>9} {lv.ms_per_job(lv.api_cores):>6.2f} {lv.ms_per_job(lv.worker_cores):>6.2f} "
            f"{lv.ms_per_job(lv.redis_cores):>6.2f} {lv.ms_per_job(lv.client_cores):>6.2f} "
            f"{lv.ms_per_job(lv.ours):>6.2f} | {lv.quiet_ceiling:>6.0f}"
        )
    print(
        "\nRESULT "
        + json.dumps(
            [
                {
                    "api_processes": lv.processes,
                    "jobs_per_s": round(lv.jobs / lv.seconds, 1),
                    "tokens_per_s": round(lv.tokens / lv.seconds),
                    "errors": lv.errors,
                    "api_cores": round(lv.api_cores, 2),
                    "api_busiest_process": round(lv.api_busiest, 2),
                    "worker_cores": round(lv.worker_cores, 2),
                    "redis_cores": round(lv.redis_cores, 2),
                    "client_cores": round(lv.client_cores, 2),
                    "other_programs_cores": round(lv.others, 2),
                    "machine_cores": round(lv.machine_cores, 2),
                    "api_cpu_ms_per_job": round(lv.ms_per_job(lv.api_cores), 2),
                    "cpu_ms_per_job": round(lv.ms_per_job(lv.ours), 2),
                    "jobs_per_s_if_alone": round(lv.quiet_ceiling),
                    "limit": lv.limit,
                }
                for lv in results
            ]
        )
    )


if __name__ == "__main__":
    main()
