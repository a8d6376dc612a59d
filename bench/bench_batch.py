"""Batch throughput: lines/s through the Batch API, against the engine alone, in one run.

1. Orchestration ceiling: a `--fake-lines` (10,000) line batch on a worker with the
   trivially fast fake engine (ENGINE=fake): what the API, Redis, Celery and the worker
   runtime cost on their own.
2. Real model: `--real-lines` (256) lines on the default model through the whole stack,
   next to the same requests on the engine alone, in-process, at the concurrency the
   batch runs at (the workers' batch share of slots).

    python bench/bench_batch.py [--fake-lines 10000] [--real-lines 256] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a queue is in one paragraph.",
]


def batch_lines(n: int, model: str, tokens: int) -> bytes:
    out = io.StringIO()
    for i in range(n):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        out.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
        out.write("\n")
    return out.getvalue().encode()


def run_stack_batch(lines: int, tokens: int, engine: str, slots: int, logs: Path) -> dict[str, float]:
    import openai
    from stack import Stack, free_port

    from common.settings import get_settings

    model = get_settings().model_name
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs / engine,
        env={
            "ENGINE": engine,
            "WORKER_SLOTS": str(slots),
            "FILES_DIR": str(logs / engine / "files"),
            "BATCH_MAX_LINES": str(max(lines, 50_000)),
        },
    )
    try:
        stack.start_redis()
        stack.start_worker()
        stack.start_api()
        stack.wait_ready(model, timeout=600)
        client = openai.OpenAI(base_url=stack.api_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        data = batch_lines(lines, model, tokens)
        t0 = time.monotonic()
        f = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        wall = time.monotonic() - t0
        assert batch.status == "completed", batch
        counts = batch.request_counts
        assert counts is not None and counts.completed == lines, counts
        running = (batch.finalizing_at or 0) - (batch.in_progress_at or 0)
        return {
            "lines": lines,
            "wall_s": wall,
            "lines_per_s": lines / wall,
            "tokens_per_s": lines * tokens / wall,
            "run_s": running,
        }
    finally:
        stack.stop()


async def run_direct(lines: int, tokens: int, concurrency: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    from common.jobs import JobRequest, SamplingSpec
    from common.settings import get_settings
    from worker.engine import build_engine

    settings = get_settings()
    tok = AutoTokenizer.from_pretrained(settings.model_path)
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for p in PROMPTS
    ]
    engine = build_engine(settings)
    await engine.start()
    spec = SamplingSpec(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    todo = list(range(lines))

    async def worker() -> None:
        while todo:
            i = todo.pop()
            async for _ in engine.generate(
                f"direct-{i}", JobRequest(prompt_token_ids=prompts[i % len(prompts)], sampling=spec)
            ):
                pass

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await engine.shutdown()
    return {"lines": lines, "wall_s": wall, "lines_per_s": lines / wall, "tokens_per_s": lines * tokens / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-lines", type=int, default=10_000)
    parser.add_argument("--real-lines", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-batch")
    parser.add_argument("--skip-fake", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from common.settings import get_settings

    share = get_settings().batch_slot_share
    concurrency = max(1, int(args.slots * share))
    rows = []
    if not args.skip_fake:
        print(f"orchestration ceiling: {args.fake_lines} lines, fake engine ...", flush=True)
        fake = run_stack_batch(args.fake_lines, 16, "fake", args.slots, args.logs)
        print(f"  {fake['lines_per_s']:.1f} lines/s ({fake['wall_s']:.1f} s)", flush=True)
        rows.append(("stack, fake engine", fake))
    print(f"engine alone: {args.real_lines} lines at {concurrency} in flight ...", flush=True)
    direct = asyncio.run(run_direct(args.real_lines, args.tokens, concurrency))
    print(f"  {direct['lines_per_s']:.2f} lines/s", flush=True)
    print(f"whole stack: {args.real_lines} lines, default model ...", flush=True)
    real = run_stack_batch(args.real_lines, args.tokens, "vllm", args.slots, args.logs)
    print(f"  {real['lines_per_s']:.2f} lines/s", flush=True)
    rows += [("engine alone (direct)", direct), ("stack, default model", real)]
    print()
    print("| run | lines | tokens/line | seconds | lines/s | output tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        per = 16 if "fake" in name else args.tokens
        tps = r["lines"] * per / r["wall_s"]
        print(f"| {name} | {r['lines']} | {per} | {r['wall_s']:.1f} | {r['lines_per_s']:.2f} | {tps:.1f} |")
    print(f"\nstack/direct on the default model: {real['lines_per_s'] / direct['lines_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
