"""CPU per request, process by process: llmq against `vllm serve` on the same load.

On a machine where the engine takes a core of its own (vLLM's CPU build binds its model
runner to one), everything else shares what is left: serve's API server, or llmq's API,
Redis and the worker's front end (Celery consumer, engine loop, AsyncLLM's output
handling), and the benchmark's client. A burst of requests is as slow to reach the
engine as that shared CPU is to get through it, so the CPU each request costs there is
where a burst's first-token time goes (bench_stream.py shows the stages). Each subject
is started alone, warmed up, then sent `--rounds` bursts of `--streams` concurrent
streaming requests of `--tokens` tokens (greedy, ignore_eos); the CPU time every process
of the subject (and this client) used meanwhile is divided by the requests.

    python bench/bench_cpu.py [--only serve,llmq] [--streams 32] [--rounds 6] [--tokens 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def role(name: str, cmdline: str) -> str | None:
    """What a process of a subject is, by its name (None: not counted)."""
    if "EngineCore" in name:
        return "engine core"
    if name.startswith("VLLM::Worker") or "VLLM::Worker" in cmdline:
        return "engine worker"
    if name == "redis-server":
        return "Redis"
    if "celeryd" in cmdline or "celery" in cmdline:
        return "worker (Celery, engine loop, AsyncLLM)"
    if "api_server" in cmdline:
        return "API server (AsyncLLM)"
    if "api.serve" in cmdline:
        return "API"
    return None


def cpu_by_role(roots: list[int]) -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for root in roots:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                what = role(p.name(), " ".join(p.cmdline()))
                t = p.cpu_times()
            except psutil.Error:
                continue
            if what is not None:
                out[what] = out.get(what, 0.0) + t.user + t.system
    return out


async def measure(url: str, model: str, roots: list[int], streams: int, rounds: int, tokens: int) -> dict[str, Any]:
    import httpx
    import psutil

    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one() -> None:
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for _ in resp.aiter_lines():
                    pass

        for _ in range(2):  # warm up
            await asyncio.gather(*(one() for _ in range(streams)))
        me = psutil.Process()
        before, mine, started = cpu_by_role(roots), me.cpu_times(), time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
        after, mine_after = cpu_by_role(roots), me.cpu_times()
    n = streams * rounds
    per = {k: (after[k] - before.get(k, after[k])) * 1000 / n for k in after}
    per["client"] = ((mine_after.user + mine_after.system) - (mine.user + mine.system)) * 1000 / n
    return {"requests": n, "seconds": elapsed, "ms": per}


async def run(which: str, streams: int, rounds: int, tokens: list[int], log_dir: Path) -> list[dict[str, Any]]:
    from common.settings import get_settings

    model = get_settings().model_name
    out = []
    if which == "serve":
        from vllm_serve import VllmServe

        server = VllmServe(log_path=log_dir / "bench-cpu-serve.log")
        await asyncio.to_thread(server.start)
        try:
            assert server.popen is not None
            for t in tokens:
                out.append(await measure(server.url, model, [server.popen.pid], streams, rounds, t))
        finally:
            server.stop()
    else:
        from stack import Stack, free_port

        stack = Stack(redis_port=free_port(), api_port=free_port(), flower_port=None, log_dir=log_dir)
        try:
            stack.start_redis()
            stack.start_worker()
            stack.start_api()
            await asyncio.to_thread(stack.wait_ready, model, 1, 600)
            roots = [p.popen.pid for p in stack.procs]
            for t in tokens:
                out.append(await measure(stack.api_url, model, roots, streams, rounds, t))
        finally:
            stack.stop()
    return out


ENGINE = ("engine core", "engine worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="serve,llmq")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-logs")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    results = {w: asyncio.run(run(w, args.streams, args.rounds, tokens, args.logs)) for w in args.only.split(",")}
    print(
        f"\nCPU per request, ms ({args.rounds} bursts of {args.streams} concurrent streaming requests; "
        "'serving' is all but the engine's two processes and the client)\n"
    )
    print("| subject | tokens | requests/s | process: ms per request | serving | client | engine core / worker |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for which, rows in results.items():
        for t, r in zip(tokens, rows, strict=True):
            ms = r["ms"]
            shared = {k: v for k, v in ms.items() if k not in ENGINE and k != "client"}
            cells = ", ".join(f"{k} {v:.2f}" for k, v in sorted(shared.items(), key=lambda kv: -kv[1]))
            engine = " / ".join(f"{ms.get(k, 0.0):.1f}" for k in ENGINE)
            rate = r["requests"] / r["seconds"]
            print(
                f"| {which} | {t} | {rate:.1f} | {cells} | {sum(shared.values()):.2f} | {ms['client']:.2f} | {engine} |"
            )


if __name__ == "__main__":
    main()
