"""Many idle streams: what N open SSE streams waiting on queued jobs cost the API.

    python bench/bench_idle.py [--streams 1000] [--api-processes 2]

A stack on free ports: Redis, one fake-engine worker with one slot whose engine step
takes an hour (so one job runs and never yields, the rest stay queued), and the API as
`--api-processes` processes (MAX_QUEUED_JOBS raised so admission control takes them
all). The client opens `--streams` streaming chat requests over raw sockets (one
connection each, nothing read after the response head), then prints, before and with
them open:

- the API's memory: RSS of every process of the API (the supervisor and each process
  serving requests) and their total, the target being under 300 MB with 1,000 streams;
- per API process: its streams (open sockets to clients), file descriptors, Redis
  connections and Redis pub/sub subscriber connections (CLIENT LIST `sub=`/`psub=`,
  matched to the process through its sockets), the target being one each, and the
  channels subscribed on it;
- the API's CPU while the streams sit idle.

Figures, not assertions: the tests check the one-subscriber property
(tests/integration/test_api_processes.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from stack import Stack, free_port, redis_clients_by_pid, socket_inodes, subscriber  # noqa: E402

sys.path.insert(0, str(ROOT))
from common.settings import get_settings  # noqa: E402

MODEL = get_settings().model_name
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (libraries every process maps) split among the
    processes sharing them, so a sum over processes counts them once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_sockets(pid: int, api_port: int) -> int:
    """Connections this process accepted on the API's port (its open streams)."""
    inodes = socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                # state 01: established; local port: the API's
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == api_port and int(cols[9]) in inodes:
                    n += 1
    return n


def snapshot(stack: Stack, r: redis.Redis, label: str) -> dict:
    group, serving = stack.api_pids(serving=False), stack.api_pids()
    clients = redis_clients_by_pid(r.client_list(), serving, stack.redis_port)
    rows = []
    for pid in serving:
        subs = [c for c in clients[pid] if subscriber(c)]
        rows.append(
            {
                "pid": pid,
                "rss_mb": round(rss_mb(pid), 1),
                "pss_mb": round(pss_mb(pid), 1),
                "streams": client_sockets(pid, stack.api_port),
                "fds": fd_count(pid),
                "redis_conns": len(clients[pid]),
                "subscriber_conns": len(subs),
                "channels": sum(int(c.get("sub", 0)) for c in subs),
            }
        )
    others = [pid for pid in group if pid not in serving]
    total = sum(rss_mb(pid) for pid in group)
    total_pss = sum(pss_mb(pid) for pid in group)
    print(
        f"\n{label}: API RSS total {total:.1f} MB, PSS total {total_pss:.1f} MB "
        f"({len(group)} processes; supervisor and resource tracker {sum(rss_mb(p) for p in others):.1f} MB RSS)"
    )
    print(
        f"  {'pid':>7} {'RSS MB':>7} {'PSS MB':>7} {'streams':>7} {'fds':>6} {'redis conns':>11} "
        f"{'subscribers':>11} {'channels':>8}"
    )
    for row in rows:
        print(
            f"  {row['pid']:>7} {row['rss_mb']:>7} {row['pss_mb']:>7} {row['streams']:>7} {row['fds']:>6} "
            f"{row['redis_conns']:>11} {row['subscriber_conns']:>11} {row['channels']:>8}"
        )
    return {"total_rss_mb": round(total, 1), "total_pss_mb": round(total_pss, 1), "processes": rows}


async def open_stream(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return reader, writer, status


async def open_streams(port: int, n: int, concurrency: int) -> tuple[list, dict[int, int], float]:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}
    ).encode()
    gate = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}

    async def one() -> tuple | None:
        async with gate:
            try:
                reader, writer, status = await open_stream(port, body)
            except (OSError, asyncio.IncompleteReadError):
                statuses[0] = statuses.get(0, 0) + 1
                return None
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                writer.close()
                return None
            return reader, writer

    start = time.perf_counter()
    conns = [c for c in await asyncio.gather(*(one() for _ in range(n))) if c is not None]
    return conns, statuses, time.perf_counter() - start


async def run(args: argparse.Namespace, stack: Stack, r: redis.Redis) -> None:
    print(f"opening {args.streams} streams ...", flush=True)
    conns, statuses, took = await open_streams(stack.api_port, args.streams, args.concurrency)
    print(f"opened {len(conns)} streams in {took:.1f} s; HTTP statuses {statuses}", flush=True)
    await asyncio.sleep(args.settle)
    pids = stack.api_pids(serving=False)
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    await asyncio.sleep(args.idle)
    cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / (time.monotonic() - t0)
    waiting = r.zcard(f"llmq:waiting:{MODEL}")
    with_streams = snapshot(stack, r, f"with {len(conns)} streams open ({waiting} jobs waiting)")
    print(f"  API CPU while they sit idle: {100 * cpu:.1f}% of one core ({args.idle:g} s)")
    print(
        "\nRESULT "
        + json.dumps(
            {
                "streams": len(conns),
                "api_processes": args.api_processes,
                "rss_mb_before": args.before["total_rss_mb"],
                "rss_mb_with_streams": with_streams["total_rss_mb"],
                "pss_mb_before": args.before["total_pss_mb"],
                "pss_mb_with_streams": with_streams["total_pss_mb"],
                "subscriber_conns_per_process": [p["subscriber_conns"] for p in with_streams["processes"]],
                "streams_per_process": [p["streams"] for p in with_streams["processes"]],
                "api_cpu_idle_pct": round(100 * cpu, 1),
            }
        )
    )
    for _reader, writer in conns:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="requests being opened at once")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last stream opened")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds the API's idle CPU is measured over")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "var" / "bench-idle-logs")
    args = parser.parse_args()
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=args.log_dir,
        api_processes=args.api_processes,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "3600",
            "WORKER_SLOTS": "1",
            "MAX_QUEUED_JOBS": str(args.streams + 100),
            "QUEUE_TIMEOUT_SECONDS": "3600",
            "QUEUE_RESEND_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
        },
    )
    try:
        stack.start_redis()
        stack.start_worker()
        stack.start_api()
        stack.wait_ready(MODEL, timeout=120)
        r = redis.Redis.from_url(stack.redis_url)
        # Every process warmed up (tokenizer built) before measuring: a few requests each.
        asyncio.run(warm_up(stack.api_port, 4 * args.api_processes))
        time.sleep(1)
        args.before = snapshot(stack, r, "before (warmed up, no stream open)")
        asyncio.run(run(args, stack, r))
    finally:
        if "worker1" in stack.running():
            stack.kill("worker1")  # its one job's step takes an hour: no waiting for it
        stack.stop()


async def warm_up(port: int, n: int) -> None:
    # Streams: the head comes at once; closing cancels the job.
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    ).encode()

    async def one() -> None:
        _reader, writer, _status = await open_stream(port, body)
        writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


if __name__ == "__main__":
    main()
