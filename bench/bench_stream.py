"""Streaming throughput and TTFT: the whole stack against the engine alone, in one run.

For each concurrency level (default 1, 8, 32, 64 streams) the same load runs twice:
  direct - vLLM's AsyncLLM in this process, through the worker's engine adapter;
  stack  - Redis + one Celery worker process + the API, driven over HTTP by concurrent
           streaming clients (SSE), as a user would.
Each stream asks for `--tokens` output tokens (greedy, ignore_eos) on the default model;
each level runs `--rounds` requests per stream, closed loop. Prints output tokens/s, TTFT
p50/p99 for both, and the ratio stack/direct.

    python bench/bench_stream.py [--levels 1,8,32,64] [--tokens 64] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@dataclass
class LevelResult:
    mode: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    ttft_p50: float
    ttft_p99: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


async def closed_loop(streams: int, rounds: int, one) -> tuple[int, float, list[float]]:  # type: ignore[no-untyped-def]
    ttfts: list[float] = []
    total = 0

    async def user() -> None:
        nonlocal total
        for _ in range(rounds):
            ttft, tokens = await one()
            ttfts.append(ttft)
            total += tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(streams)))
    return total, time.perf_counter() - t0, ttfts


async def run_direct(levels: list[int], tokens: int, rounds: int) -> list[LevelResult]:
    from transformers import AutoTokenizer

    from common.jobs import JobRequest, SamplingSpec
    from common.settings import get_settings
    from worker.engine import build_engine

    settings = get_settings()
    tok = AutoTokenizer.from_pretrained(settings.model_path)
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    engine = build_engine(settings)
    await engine.start()
    spec = SamplingSpec(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    counter = 0

    async def one() -> tuple[float, int]:
        nonlocal counter
        counter += 1
        t0 = time.perf_counter()
        ttft = None
        n = 0
        async for deltas in engine.generate(f"bench-{counter}", JobRequest(prompt_token_ids=ids, sampling=spec)):
            for d in deltas:
                n += len(d.token_ids)
                if ttft is None and d.text:
                    ttft = time.perf_counter() - t0
        return (ttft if ttft is not None else time.perf_counter() - t0), n

    results = []
    try:
        await one()  # warm-up
        for streams in levels:
            total, seconds, ttfts = await closed_loop(streams, rounds, one)
            r = LevelResult("direct", streams, len(ttfts), total, seconds, percentile(ttfts, 50), percentile(ttfts, 99))
            print(f"  direct {streams:>3} streams: {r.tokens_per_s:7.1f} tok/s  TTFT p50 {r.ttft_p50:.3f}s", flush=True)
            results.append(r)
    finally:
        await engine.shutdown()
    return results


async def run_stack(levels: list[int], tokens: int, rounds: int, log_dir: Path) -> list[LevelResult]:
    import httpx
    from stack import Stack, free_port

    from common.settings import get_settings

    model = get_settings().model_name
    slots = max(64, max(levels))
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=log_dir,
        env={"WORKER_SLOTS": str(slots)},
    )
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    results = []
    try:
        stack.start_redis()
        stack.start_worker()
        stack.start_api()
        stack.wait_ready(model, timeout=600)
        limits = httpx.Limits(max_connections=slots + 8, max_keepalive_connections=slots + 8)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=600, limits=limits) as http:

            async def one() -> tuple[float, int]:
                t0 = time.perf_counter()
                ttft = None
                usage = 0
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if ttft is None and '"content":"' in line and '"content":""' not in line:
                            ttft = time.perf_counter() - t0
                        if '"usage":{' in line:
                            usage = json.loads(line[6:])["usage"]["completion_tokens"]
                return (ttft if ttft is not None else time.perf_counter() - t0), usage

            await one()  # warm-up (loads the API's tokenizer)
            for streams in levels:
                total, seconds, ttfts = await closed_loop(streams, rounds, one)
                r = LevelResult(
                    "stack", streams, len(ttfts), total, seconds, percentile(ttfts, 50), percentile(ttfts, 99)
                )
                print(
                    f"  stack  {streams:>3} streams: {r.tokens_per_s:7.1f} tok/s  TTFT p50 {r.ttft_p50:.3f}s",
                    flush=True,
                )
                results.append(r)
    finally:
        stack.stop()
    return results


def report(direct: list[LevelResult], stack: list[LevelResult], tokens: int) -> str:
    lines = [
        f"output tokens/s and TTFT, {tokens} tokens per stream (greedy, ignore_eos)",
        "",
        "| streams | direct tok/s | stack tok/s | stack/direct | direct TTFT p50 / p99 | stack TTFT p50 / p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d, s in zip(direct, stack, strict=True):
        lines.append(
            f"| {d.streams} | {d.tokens_per_s:.1f} | {s.tokens_per_s:.1f} | {s.tokens_per_s / d.tokens_per_s:.2f} "
            f"| {d.ttft_p50:.3f} / {d.ttft_p99:.3f} s | {s.ttft_p50:.3f} / {s.ttft_p99:.3f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="stack vs direct engine: streaming throughput and TTFT")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-logs")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    print("direct engine (in-process):", flush=True)
    direct = asyncio.run(run_direct(levels, args.tokens, args.rounds))
    print("whole stack (API + Redis + Celery worker), SSE clients:", flush=True)
    stack = asyncio.run(run_stack(levels, args.tokens, args.rounds, args.logs))
    print()
    print(report(direct, stack, args.tokens))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "direct": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in direct],
                    "stack": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in stack],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
