"""Batch throughput: lines/s through the Batch API, against the engine alone, in one run.

1. Orchestration ceiling: a `--fake-lines` (10,000) line batch on a worker with the
   trivially fast fake engine (ENGINE=fake): what the API, Redis, Celery and the worker
   runtime cost on their own, with the CPU seconds each process spent per line (where
   the ceiling sits).
2. API memory for a large input file (`--memory-mb`, 200 MB; fake engine, one token a
   line): the API's resident memory (all its processes) idle, after the upload, after
   validation, at its peak while the lines run, after the results are written and after
   the output file is downloaded. The file is written to disk and streamed both ways.
   Its lines are padded in a body field the API reads and ignores (`--memory-padding
   prompt`: in the prompt, tokenized like any prompt, which takes many minutes here).
3. Real model: `--real-lines` (256) lines on the default model through the whole stack,
   next to the same requests on the engine alone, in-process, at the concurrency the
   batch runs at (the workers' batch share of slots).

    python bench/bench_batch.py [--fake-lines 10000] [--memory-mb 200] [--real-lines 256]
                                [--tokens 32] [--memory-padding field|prompt]
                                [--skip-fake] [--skip-memory] [--skip-real]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a queue is in one paragraph.",
]


def write_batch_file(path: Path, n: int, model: str, tokens: int, line_bytes: int = 0, padding: str = "prompt") -> int:
    """Write an input file of `n` lines; with `line_bytes`, each line is padded with words
    to about that size, in its prompt (`padding="prompt"`: tokenized and stored like any
    prompt) or in a body field the API reads and ignores (`"field"`: the file's bytes
    without the cost of tokenizing them). Returns its size in bytes."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = PROMPTS[i % len(PROMPTS)]
            pad = ""
            if line_bytes:
                words = " ".join(f"word{(i + k) % 997}" for k in range(line_bytes // 8))
                pad = words[: max(0, line_bytes - 260)]
            body: dict[str, object] = {
                "model": model,
                "messages": [{"role": "user", "content": f"{prompt} {pad}" if padding == "prompt" and pad else prompt}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if padding == "field" and pad:
                body["metadata"] = {"padding": pad}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    return path.stat().st_size


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every process in a process group."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (MB)."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def phases(result: dict[str, float]) -> str:
    """When the batch was first seen in each status, seconds from the upload's start."""
    return ", ".join(f"{k[5:-2]} at {v:.1f} s" for k, v in result.items() if k.startswith("seen_"))


def run_stack_batch(
    lines: int,
    tokens: int,
    engine: str,
    slots: int,
    logs: Path,
    line_bytes: int = 0,
    padding: str = "prompt",
    workers: int = 1,
    trials: int = 1,
) -> dict[str, float]:
    """`trials` batches of `lines` lines, one after the other on one stack: the figures of
    the trial at the median rate (the upper of the middle two, for an even count), and
    every trial's rate (`trial_lines_per_s`)."""
    import openai
    from stack import Stack, free_port

    from common.settings import get_settings

    model = get_settings().model_name
    folder = logs / (engine if not line_bytes else f"{engine}-memory")
    stack = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=folder,
        env={
            "ENGINE": engine,
            "WORKER_SLOTS": str(slots),
            "FILES_DIR": str(folder / "files"),
            "BATCH_MAX_LINES": str(max(lines, 50_000)),
            "BATCH_MAX_BYTES": str(512 * 1024 * 1024),
        },
    )
    try:
        stack.start_redis()
        for i in range(workers):
            stack.start_worker(f"worker{i + 1}")
        stack.start_api()
        stack.wait_ready(model, workers=workers, timeout=600)
        procs = {p.name: p.popen.pid for p in stack.procs}
        client = openai.OpenAI(base_url=stack.api_url + "/v1", api_key="unused", max_retries=0, timeout=1800)
        src = folder / "input.jsonl"
        size = write_batch_file(src, lines, model, tokens, line_bytes, padding)
        runs = [_one_batch(client, stack.api_url, src, procs, lines, tokens) for _ in range(trials)]
        # The trial at the median rate stands for the run; every trial's rate is kept.
        result = dict(sorted(runs, key=lambda r: r["lines_per_s"])[len(runs) // 2])
        result["bytes"] = size
        result["trial_lines_per_s"] = [r["lines_per_s"] for r in runs]  # type: ignore[assignment]
        return result
    finally:
        stack.stop()


def _one_batch(
    client: Any, api_url: str, src: Path, procs: dict[str, int], lines: int, tokens: int
) -> dict[str, float]:
    """Upload `src`, run it as a batch, download its output: timings, the CPU each process
    spent a line, and the API's resident memory through it."""
    import httpx

    api = procs["api"]
    rss = {"idle": group_rss_mb(api)}
    cpu0 = {name: group_cpu_s(pid) for name, pid in procs.items()}
    t0 = time.monotonic()
    with open(src, "rb") as fh:
        f = client.files.create(file=("bench.jsonl", fh), purpose="batch")
    rss["uploaded"] = group_rss_mb(api)
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    running = 0.0
    # When each status was first seen (s from the upload's start; polled every 0.1 s).
    seen = {batch.status: time.monotonic() - t0}
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
        seen.setdefault(batch.status, time.monotonic() - t0)
        if batch.status == "validating":
            continue
        rss.setdefault("validated", group_rss_mb(api))
        running = max(running, group_rss_mb(api))
    wall = time.monotonic() - t0
    cpu = {name: group_cpu_s(pid) - cpu0[name] for name, pid in procs.items()}
    rss["running_peak"] = running
    rss["results"] = group_rss_mb(api)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and counts.completed == lines, counts
    # The output file, streamed to nowhere.
    with httpx.stream("GET", f"{api_url}/v1/files/{batch.output_file_id}/content", timeout=600) as r:
        out_bytes = sum(len(chunk) for chunk in r.iter_bytes())
    rss["downloaded"] = group_rss_mb(api)
    # Neither file is needed again: the next trial starts from the same disk use.
    client.files.delete(f.id)
    if batch.output_file_id:
        client.files.delete(batch.output_file_id)
    return {
        "lines": lines,
        "out_bytes": out_bytes,
        "wall_s": wall,
        "lines_per_s": lines / wall,
        "tokens_per_s": lines * tokens / wall,
        "run_s": (batch.finalizing_at or 0) - (batch.in_progress_at or 0),
        **{f"seen_{status}_s": at for status, at in seen.items()},
        **{f"cpu_ms_per_line_{name}": 1000 * c / lines for name, c in cpu.items()},
        **{f"rss_{k}": v for k, v in rss.items()},
    }


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
    parser.add_argument("--memory-mb", type=int, default=200)
    parser.add_argument("--memory-line-bytes", type=int, default=8192)
    parser.add_argument(
        "--memory-padding",
        choices=("prompt", "field"),
        default="field",
        help="where a large line's bytes are: an ignored body field (default) or its prompt (tokenized: much longer)",
    )
    parser.add_argument("--real-lines", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="fake-engine worker processes for the ceiling row")
    parser.add_argument(
        "--trials", type=int, default=3, help="ceiling batches one after the other; the median's figures stand"
    )
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-batch")
    parser.add_argument("--skip-fake", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-real", action="store_true", help="no model needed: the fake-engine rows only")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from common.settings import get_settings

    share = get_settings().batch_slot_share
    concurrency = max(1, int(args.slots * share))
    rows: list[tuple[str, dict[str, float], int]] = []
    fake: dict[str, float] | None = None
    if not args.skip_fake:
        print(
            f"orchestration ceiling: {args.trials} x {args.fake_lines} lines, fake engine, "
            f"{args.workers} worker(s) ...",
            flush=True,
        )
        fake = run_stack_batch(
            args.fake_lines, 16, "fake", args.slots, args.logs, workers=args.workers, trials=args.trials
        )
        trials = ", ".join(f"{r:.1f}" for r in fake["trial_lines_per_s"])  # type: ignore[attr-defined]
        print(f"  trials: {trials} lines/s", flush=True)
        print(f"  median {fake['lines_per_s']:.1f} lines/s ({fake['wall_s']:.1f} s; {phases(fake)})", flush=True)
        rows.append((f"stack, fake engine, {args.workers} worker(s)", fake, 16))
    memory: dict[str, float] | None = None
    if not args.skip_memory:
        n = max(1, args.memory_mb * 1024 * 1024 // args.memory_line_bytes)
        print(
            f"API memory: a {args.memory_mb} MB input file ({n} lines, padded in the {args.memory_padding}), "
            "fake engine ...",
            flush=True,
        )
        memory = run_stack_batch(
            n, 1, "fake", args.slots, args.logs, line_bytes=args.memory_line_bytes, padding=args.memory_padding
        )
        print(f"  {memory['lines_per_s']:.1f} lines/s ({memory['wall_s']:.1f} s)", flush=True)
    real = direct = None
    if not args.skip_real:
        print(f"engine alone: {args.real_lines} lines at {concurrency} in flight ...", flush=True)
        direct = asyncio.run(run_direct(args.real_lines, args.tokens, concurrency))
        print(f"  {direct['lines_per_s']:.2f} lines/s", flush=True)
        print(f"whole stack: {args.real_lines} lines, default model ...", flush=True)
        real = run_stack_batch(args.real_lines, args.tokens, "vllm", args.slots, args.logs)
        print(f"  {real['lines_per_s']:.2f} lines/s", flush=True)
        rows += [("engine alone (direct)", direct, args.tokens), ("stack, default model", real, args.tokens)]
    print()
    print("| run | lines | tokens/line | seconds | lines/s | output tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, per in rows:
        tps = r["lines"] * per / r["wall_s"]
        print(f"| {name} | {r['lines']} | {per} | {r['wall_s']:.1f} | {r['lines_per_s']:.2f} | {tps:.1f} |")
    if fake is not None:
        print(f"\nfake engine, every trial: {trials} lines/s (the table: the median)")
        print("\nCPU per line, fake engine, the median trial (ms; the process that spends the most sets the ceiling):")
        print("| " + " | ".join(k.removeprefix("cpu_ms_per_line_") for k in fake if k.startswith("cpu_ms")) + " |")
        print("|" + "---:|" * sum(1 for k in fake if k.startswith("cpu_ms")))
        print("| " + " | ".join(f"{v:.2f}" for k, v in fake.items() if k.startswith("cpu_ms")) + " |")
    if memory is not None:
        size_mb = memory["bytes"] / 1e6
        print(f"\nAPI resident memory (MB, all its processes), {size_mb:.0f} MB input, {memory['lines']} lines:")
        stages = ("idle", "uploaded", "validated", "running_peak", "results", "downloaded")
        print("| " + " | ".join(stages) + " |")
        print("|" + "---:|" * len(stages))
        print("| " + " | ".join(f"{memory.get('rss_' + k, 0):.0f}" for k in stages) + " |")
    if real is not None and direct is not None:
        print(f"\nstack/direct on the default model: {real['lines_per_s'] / direct['lines_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
