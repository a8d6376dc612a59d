"""Streaming throughput, first-token and inter-token latency: llmq against `vllm serve` and
the engine alone, in one run, with where llmq's first-token time goes.

For each concurrency level (default 1, 8, 32, 64 streams) the same load runs on:
  engine - vLLM's AsyncLLM in this process, through the worker's engine adapter;
  serve  - vLLM's own OpenAI server (`vllm serve`, scripts/vllm_serve.py) with the
           worker's engine settings (dtype, eager, max_num_seqs);
  llmq   - Redis + one Celery worker process + the API (scripts/stack.py).
serve and llmq are driven by the very same HTTP streaming client (httpx, SSE). Each stream
asks for `--tokens` output tokens (greedy, ignore_eos) on the default model and makes
`--requests` requests one after the other (closed loop), or more at low levels so that a
round has at least `--min-requests`; a level runs `--rounds` times. Throughput is the
median over rounds; latency percentiles are over every request of the level's rounds,
and the TTFT table also gives llmq - serve round by round (each pair ran back to back)
and the median of those differences: their spread is how far one run's figures can be
trusted (a round's requests come in bursts that make the same engine steps).

The three are started once and take turns, round by round (engine, serve, llmq, then
llmq, serve, engine, ...), each alone on the machine: the others' engine processes are
stopped (SIGSTOP) while it runs. A shared machine's speed drifts by 10-15% over the
minutes a run takes; run one subject after the other and the drift lands on whichever
ran last, larger than the margins the ratios are read for. Prints tok/s, TTFT p50/p99, inter-token
latency (between content chunks) p50/p99 and the worst stream's p99, llmq/serve ratios
and the milliseconds llmq adds to TTFT; then, from per-job stamps the API and the worker
write with BENCH_TIMING=1 (common/timing.py), llmq's first-token time by stage.

    python bench/bench_stream.py [--only engine,serve,llmq] [--levels 1,8,32,64] [--tokens 64]
                                 [--rounds 4] [--requests 2] [--min-requests 8] [--no-breakdown]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import timing  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
MODES = ("engine", "serve", "llmq")
TITLES = {
    "engine": "engine alone (AsyncLLM in-process)",
    "serve": "vllm serve (vLLM's OpenAI server), HTTP streaming clients",
    "llmq": "llmq (API + Redis + Celery worker), HTTP streaming clients",
}


@dataclass
class Sample:
    """One request as its client saw it."""

    ttft: float
    tokens: int
    # Seconds between consecutive content chunks.
    gaps: list[float]
    chunks: int
    job_id: str | None = None
    sent: float = 0.0  # wall clock: request sent
    first: float = 0.0  # wall clock: first content chunk
    # Seconds from the last content chunk to the end of the response ([DONE], usage, close).
    tail: float = 0.0


@dataclass
class Round:
    tokens: int
    seconds: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Level:
    mode: str
    streams: int
    rounds: list[Round] = field(default_factory=list)
    errors: int = 0

    def median(self, figure: Callable[[Round], float]) -> float:
        return statistics.median(figure(r) for r in self.rounds)

    def by_round(self, q: float) -> list[float]:
        """TTFT percentile `q` of each round, in the order they ran."""
        return [percentile([s.ttft for s in r.samples], q) for r in self.rounds]

    def pooled(self, figure: Callable[[Sample], list[float]], q: float) -> float:
        """Percentile `q` of `figure` over every request of every round (a round of one
        stream has a few requests only: its own p50 is a mean of two or three)."""
        return percentile([v for r in self.rounds for s in r.samples for v in figure(s)] or [0.0], q)

    def summary(self) -> dict[str, float]:
        def worst_stream_p99(r: Round) -> float:
            return max(percentile(s.gaps, 99) if s.gaps else 0.0 for s in r.samples)

        def tokens_per_chunk(r: Round) -> float:
            return sum(s.tokens for s in r.samples) / max(1, sum(s.chunks for s in r.samples))

        return {
            "tokens_per_s": self.median(lambda r: r.tokens_per_s),
            "ttft_p50": self.pooled(lambda s: [s.ttft], 50),
            "ttft_p99": self.pooled(lambda s: [s.ttft], 99),
            "itl_p50": self.pooled(lambda s: s.gaps, 50),
            "itl_p99": self.pooled(lambda s: s.gaps, 99),
            "itl_worst_stream_p99": self.median(worst_stream_p99),
            "tokens_per_chunk": self.median(tokens_per_chunk),
            "end_p50": self.pooled(lambda s: [s.tail], 50),
            "end_p99": self.pooled(lambda s: [s.tail], 99),
            "requests": sum(len(r.samples) for r in self.rounds),
            "rounds": len(self.rounds),
            "errors": self.errors,
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


async def closed_loop(streams: int, requests: int, one: Callable[[], Awaitable[Sample]]) -> Round:
    samples: list[Sample] = []

    async def user() -> None:
        for _ in range(requests):
            samples.append(await one())

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(streams)))
    return Round(sum(s.tokens for s in samples), time.perf_counter() - t0, samples)


def print_level(level: Level) -> None:
    if level.rounds:
        s = level.summary()
        print(
            f"  {level.mode:<6} {level.streams:>3} streams: {s['tokens_per_s']:7.1f} tok/s  "
            f"TTFT p50 {s['ttft_p50'] * 1e3:7.1f} p99 {s['ttft_p99'] * 1e3:7.1f} ms  "
            f"ITL p50 {s['itl_p50'] * 1e3:6.1f} p99 {s['itl_p99'] * 1e3:6.1f} ms",
            flush=True,
        )


# -- the three subjects -------------------------------------------------------------------


def parent(pid: int) -> int:
    """`pid`'s parent, from /proc (0: gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := parent(int(entry))):
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class Subject:
    """One system under load: started once, then given the machine in turns. While another
    runs its round, its engine's processes are stopped (SIGSTOP): on a machine with fewer
    cores than engines an idle engine is not idle (an engine core keeps polling its queues
    for a while, vLLM's CPU threads spin), and the subjects would measure each other. The
    processes that hold connections (an HTTP server, the Celery consumer) keep running."""

    mode: str = ""

    def __init__(self) -> None:
        self.one: Callable[[], Awaitable[Sample]] | None = None
        self._paused: list[int] = []

    def engine_roots(self) -> list[int]:
        """The processes whose descendants are the engine (stopped between turns)."""
        return []

    def engine_pids(self) -> list[int]:
        return [p for root in self.engine_roots() for p in descendants(root)]

    async def pause(self) -> None:
        self._paused = self.engine_pids()
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    async def resume(self) -> None:
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []
        await asyncio.sleep(0.5)

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class EngineSubject(Subject):
    """vLLM's AsyncLLM in this process, through the worker's engine adapter."""

    mode = "engine"

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.engine: Any = None
        self._own: list[int] = []

    def engine_pids(self) -> list[int]:
        # Only the processes the engine started (serve and llmq are children of this one too).
        return [p for root in self._own for p in (root, *descendants(root))]

    async def start(self) -> None:
        from transformers import AutoTokenizer

        from common.jobs import JobRequest, SamplingSpec
        from common.settings import get_settings
        from worker.engine import build_engine

        settings = get_settings()
        tok = AutoTokenizer.from_pretrained(settings.model_path)
        text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        before = set(descendants(os.getpid()))
        self.engine = build_engine(settings)
        await self.engine.start()
        mine = set(descendants(os.getpid())) - before
        self._own = [p for p in mine if parent(p) not in mine]
        spec = SamplingSpec(max_tokens=self.tokens, temperature=0.0, ignore_eos=True)
        counter = 0
        engine = self.engine

        async def one() -> Sample:
            nonlocal counter
            counter += 1
            t0 = time.perf_counter()
            arrivals: list[float] = []
            n = 0
            async for deltas in engine.generate(f"bench-{counter}", JobRequest(prompt_token_ids=ids, sampling=spec)):
                n += sum(len(d.token_ids) for d in deltas)
                if any(d.text for d in deltas):
                    arrivals.append(time.perf_counter())
            return sample(t0, arrivals, n)

        self.one = one

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()


def sample(t0: float, arrivals: list[float], tokens: int, job_id: str | None = None, sent: float = 0.0) -> Sample:
    now = time.perf_counter()
    end = arrivals[0] if arrivals else now
    return Sample(
        ttft=end - t0,
        tail=now - arrivals[-1] if arrivals else 0.0,
        tokens=tokens,
        gaps=[b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        chunks=len(arrivals),
        job_id=job_id,
        sent=sent,
        first=sent + (end - t0),
    )


def http_client(base_url: str, streams: int, tokens: int, model: str) -> tuple[Any, Callable[[], Awaitable[Sample]]]:
    """An HTTP streaming chat client (the same for vllm serve and llmq): a request's Sample."""
    import httpx

    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    http = httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits)
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one() -> Sample:
        sent = time.time()
        t0 = time.perf_counter()
        arrivals: list[float] = []
        usage = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            job_id = resp.headers.get("x-request-id")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error in stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    arrivals.append(now)
        if usage != tokens:
            raise RuntimeError(f"asked for {tokens} tokens, usage says {usage}")
        return sample(t0, arrivals, usage, job_id, sent)

    return http, one


class ServeSubject(Subject):
    """vLLM's own OpenAI server (`vllm serve`); its engine core and workers pause."""

    mode = "serve"

    def __init__(self, streams: int, tokens: int, log_dir: Path) -> None:
        super().__init__()
        from vllm_serve import VllmServe

        self.server = VllmServe(log_path=log_dir / "vllm-serve.log")
        self.streams, self.tokens = streams, tokens
        self.http: Any = None

    def engine_roots(self) -> list[int]:
        return [self.server.popen.pid] if self.server.popen is not None else []

    async def start(self) -> None:
        from common.settings import get_settings

        print("  " + " ".join(self.server.command()[1:]), flush=True)
        await asyncio.to_thread(self.server.start)
        self.http, self.one = http_client(self.server.url, self.streams, self.tokens, get_settings().model_name)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        self.server.stop()


class LlmqSubject(Subject):
    """Redis + one Celery worker process + the API (scripts/stack.py); the worker's engine
    core pauses (the worker process itself keeps its heartbeat and its broker connection)."""

    mode = "llmq"

    def __init__(self, streams: int, tokens: int, log_dir: Path, breakdown: bool) -> None:
        super().__init__()
        from stack import Stack, free_port

        env = {"WORKER_SLOTS": os.environ["WORKER_SLOTS"]}
        if breakdown:
            env["BENCH_TIMING"] = "1"
        self.stack = Stack(redis_port=free_port(), api_port=free_port(), flower_port=None, log_dir=log_dir, env=env)
        self.streams, self.tokens = streams, tokens
        self.http: Any = None

    def engine_roots(self) -> list[int]:
        return [p.popen.pid for p in self.stack.procs if p.name.startswith("worker") and p.popen.poll() is None]

    async def start(self) -> None:
        from common.settings import get_settings

        model = get_settings().model_name
        self.stack.start_redis()
        self.stack.start_worker()
        self.stack.start_api()
        await asyncio.to_thread(self.stack.wait_ready, model, 1, 600)
        self.http, self.one = http_client(self.stack.api_url, self.streams, self.tokens, model)

    def stamps(self, levels: list[Level]) -> dict[int, list[dict[str, float]]]:
        """The BENCH_TIMING stamps of every request of `levels`, per level."""
        import redis

        from common import keys

        out: dict[int, list[dict[str, float]]] = {}
        r = redis.Redis.from_url(self.stack.redis_url)
        try:
            for level in levels:
                rows = out.setdefault(level.streams, [])
                for s in (s for rnd in level.rounds for s in rnd.samples):
                    raw = r.hgetall(keys.job_timing(s.job_id)) if s.job_id else {}
                    got = {keys.text(k): float(v) for k, v in raw.items()}
                    got.update(sent=s.sent, client=s.first)
                    rows.append(got)
        finally:
            r.close()
        return out

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        self.stack.stop()


async def run_all(
    modes: list[str],
    levels: list[int],
    tokens: int,
    rounds: int,
    requests: int,
    min_requests: int,
    log_dir: Path,
    breakdown: bool,
) -> tuple[dict[str, list[Level]], dict[int, list[dict[str, float]]]]:
    """Start every subject, then run each level's rounds taking turns: round r runs the
    subjects in order (r even) or in reverse (r odd), each alone on the machine (the others'
    engines stopped), so a drift of the machine's speed during the run falls on all of
    them alike rather than on whichever ran last."""
    streams = max(levels)
    subjects: list[Subject] = []
    for mode in modes:
        if mode == "engine":
            subjects.append(EngineSubject(tokens))
        elif mode == "serve":
            subjects.append(ServeSubject(streams, tokens, log_dir))
        else:
            subjects.append(LlmqSubject(streams, tokens, log_dir, breakdown))
    results: dict[str, list[Level]] = {s.mode: [] for s in subjects}
    stamps: dict[int, list[dict[str, float]]] = {}
    try:
        for subject in subjects:
            print(f"{TITLES[subject.mode]}: starting", flush=True)
            await subject.start()
            assert subject.one is not None
            await subject.one()  # warm-up (the API's tokenizer, the first engine steps)
            await subject.pause()
        for n in levels:
            by_mode = {s.mode: Level(s.mode, n) for s in subjects}
            for r in range(rounds):
                for subject in subjects if r % 2 == 0 else subjects[::-1]:
                    level = by_mode[subject.mode]
                    assert subject.one is not None
                    await subject.resume()
                    try:
                        each = max(requests, -(-min_requests // n))
                        level.rounds.append(await closed_loop(n, each, subject.one))
                    except Exception as exc:  # a failed request spoils its round, not the run
                        level.errors += 1
                        print(f"  {subject.mode} {n} streams: a round failed: {exc!r}", flush=True)
                    await subject.pause()
            for subject in subjects:
                print_level(by_mode[subject.mode])
                results[subject.mode].append(by_mode[subject.mode])
        for subject in subjects:
            if isinstance(subject, LlmqSubject) and breakdown:
                await asyncio.sleep(1.0)  # the last jobs' stamps are written after their end
                stamps = subject.stamps(results["llmq"])
    finally:
        for subject in subjects:
            await subject.resume()
            with contextlib.suppress(Exception):
                await subject.stop()
    return results, stamps


# -- the report ---------------------------------------------------------------------------


def round_differences(levels_of: dict[str, dict[int, Level]], n: int) -> list[float]:
    """llmq's TTFT p50 minus serve's, round by round (each pair ran back to back), at `n`
    streams; empty if a round failed (nothing to pair). A round's requests start in
    bursts and make the same engine steps, so a round is nearer one sample than many: the
    rounds' spread is how far a level's pooled median can be read, and the median of the
    rounds' differences is the sturdier figure."""
    llmq, serve = levels_of.get("llmq", {}).get(n), levels_of.get("serve", {}).get(n)
    if llmq is None or serve is None or not llmq.rounds or len(llmq.rounds) != len(serve.rounds):
        return []
    return [a - b for a, b in zip(llmq.by_round(50), serve.by_round(50), strict=True)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(results: dict[str, list[Level]], tokens: int, dtype: str) -> str:
    by = {mode: {lv.streams: lv.summary() for lv in levels if lv.rounds} for mode, levels in results.items()}
    levels = sorted({n for per in by.values() for n in per})
    present = [m for m in MODES if m in by]
    lines = [
        f"dtype {dtype}; {tokens} output tokens per request (greedy, ignore_eos); tok/s: median over rounds; "
        "latencies: percentiles over every request of a level",
        "",
        "| streams | " + " | ".join(f"{m} tok/s" for m in present) + " | llmq/serve | llmq/engine |",
        "|---:|" + "---:|" * (len(present) + 2),
    ]

    def ratio(a: str, b: str, n: int, key: str) -> str:
        if n in by.get(a, {}) and n in by.get(b, {}):
            return f"{by[a][n][key] / by[b][n][key]:.2f}"
        return "-"

    def cell(mode: str, n: int, *figures: str, scale: Callable[[float], str] = ms) -> str:
        s = by[mode].get(n)
        return " / ".join(scale(s[f]) for f in figures) if s else "-"

    for n in levels:
        row = [cell(m, n, "tokens_per_s", scale=lambda v: f"{v:.1f}") for m in present]
        lines.append(f"| {n} | " + " | ".join(row) + f" | {ratio('llmq', 'serve', n, 'tokens_per_s')} "
                     f"| {ratio('llmq', 'engine', n, 'tokens_per_s')} |")  # fmt: skip

    def added(n: int, key: str) -> str:
        if n in by.get("llmq", {}) and n in by.get("serve", {}):
            return f"{(by['llmq'][n][key] - by['serve'][n][key]) * 1e3:+.1f}"
        return "-"

    lines += [
        "",
        "TTFT p50 / p99, ms (request sent to first content)",
        "",
        "| streams | " + " | ".join(present) + " | llmq-serve p50 | llmq-serve p99 | llmq/serve p99 "
        "| llmq-serve p50, median of rounds | by round |",
        "|---:|" + "---:|" * (len(present) + 4) + "---|",
    ]
    levels_of = {mode: {lv.streams: lv for lv in levels_} for mode, levels_ in results.items()}

    def by_round(n: int) -> str:
        diffs = round_differences(levels_of, n)
        if not diffs:
            return "- | -"  # (a failed round leaves nothing to pair)
        return f"{statistics.median(diffs) * 1e3:+.1f} | " + ", ".join(f"{d * 1e3:+.1f}" for d in diffs)

    for n in levels:
        row = [cell(m, n, "ttft_p50", "ttft_p99") for m in present]
        lines.append(f"| {n} | " + " | ".join(row) + f" | {added(n, 'ttft_p50')} | {added(n, 'ttft_p99')} "
                     f"| {ratio('llmq', 'serve', n, 'ttft_p99')} | {by_round(n)} |")  # fmt: skip
    lines += [
        "",
        "Inter-token latency, ms: between content chunks p50 / p99 (all streams), worst stream's p99; tokens per "
        "chunk; end: last content chunk to the response's end, p50 / p99 ms",
        "",
        "| streams | " + " | ".join(f"{m} p50 / p99 / worst" for m in present) + " | "
        + " | ".join(f"{m} tok/chunk" for m in present) + " | "
        + " | ".join(f"{m} end" for m in present) + " |",
        "|---:|" + "---:|" * (3 * len(present)),
    ]  # fmt: skip
    for n in levels:
        row = [cell(m, n, "itl_p50", "itl_p99", "itl_worst_stream_p99") for m in present]
        row += [cell(m, n, "tokens_per_chunk", scale=lambda v: f"{v:.2f}") for m in present]
        row += [cell(m, n, "end_p50", "end_p99") for m in present]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    errors = {f"{lv.mode}@{lv.streams}": lv.errors for levels_ in results.values() for lv in levels_ if lv.errors}
    if errors:
        lines += ["", f"failed rounds (left out): {errors}"]
    return "\n".join(lines)


def stage_figures(rows: list[dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    """Per stage: p50, p99 (seconds) and how many requests had both its stamps."""
    per: dict[str, list[float]] = {}
    for stamps in rows:
        for name, seconds in timing.stage_durations(stamps).items():
            per.setdefault(name, []).append(seconds)
        if "sent" in stamps and "client" in stamps:
            per.setdefault("TTFT", []).append(stamps["client"] - stamps["sent"])
    return {name: (percentile(v, 50), percentile(v, 99), len(v)) for name, v in per.items()}


def breakdown_report(stamps: dict[int, list[dict[str, float]]], results: dict[str, list[Level]]) -> str:
    levels = sorted(stamps)
    figures = {n: stage_figures(stamps[n]) for n in levels}
    lines = [
        "llmq's time to first token by stage, ms p50 / p99 (BENCH_TIMING stamps, every request of the level)",
        "",
        "| stage | what | " + " | ".join(f"{n} streams" for n in levels) + " |",
        "|---|---|" + "---:|" * len(levels),
    ]
    for name, _, _, what in (*timing.STAGES, ("TTFT", "", "", "sent to first content, as the client saw it")):
        cells = []
        for n in levels:
            f = figures[n].get(name)
            cells.append(f"{ms(f[0])} / {ms(f[1])}" if f else "-")
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    for mode in ("engine", "serve"):
        by = {lv.streams: lv.summary() for lv in results.get(mode, []) if lv.rounds}
        if by:
            cells = [f"{ms(by[n]['ttft_p50'])} / {ms(by[n]['ttft_p99'])}" if n in by else "-" for n in levels]
            lines.append(f"| ({mode} TTFT) | for comparison | " + " | ".join(cells) + " |")
    missing = {n: sum(1 for r in stamps[n] if "sse" not in r) for n in levels}
    if any(missing.values()):
        lines += ["", f"requests without the API's stamps (left out of their stages): {missing}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="llmq vs vllm serve vs the engine alone: streaming figures")
    parser.add_argument("--only", default=",".join(MODES), help="which of engine,serve,llmq to run")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="runs of each level, taking turns")
    parser.add_argument("--requests", type=int, default=2, help="requests per stream in each round")
    parser.add_argument(
        "--min-requests", type=int, default=8, help="requests per round at least (more per stream at low levels)"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="llmq without BENCH_TIMING stamps")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-logs")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--only takes {','.join(MODES)}; not {','.join(sorted(unknown))}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # The llmq worker's slots, and so max_num_seqs for all three (worker.engine.max_num_seqs).
    os.environ.setdefault("WORKER_SLOTS", str(max(64, max(levels))))

    from common.settings import get_settings
    from worker.engine import max_num_seqs, resolve_dtype, resolve_eager

    settings = get_settings()
    dtype = resolve_dtype(settings)
    if dtype == "auto":  # vLLM's auto: the checkpoint's own
        config = json.loads((Path(settings.model_path) / "config.json").read_text())
        dtype = f"auto ({config.get('torch_dtype') or config.get('dtype')})"
    print(
        f"model {settings.model_name}, engine {settings.engine}, dtype {dtype}, "
        f"enforce_eager {resolve_eager(settings)}, llmq API processes {os.environ.get('API_PROCESSES', '1')}, "
        f"max_num_seqs {max_num_seqs(settings)}, levels {levels}, {args.rounds} rounds x {args.requests} "
        f"requests per stream (at least {args.min_requests} a round), {args.tokens} tokens",
        flush=True,
    )
    results, stamps = asyncio.run(
        run_all(
            [m for m in MODES if m in modes],
            levels,
            args.tokens,
            args.rounds,
            args.requests,
            args.min_requests,
            args.logs,
            not args.no_breakdown,
        )
    )
    print()
    print(report(results, args.tokens, dtype))
    if stamps:
        print()
        print(breakdown_report(stamps, results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {
            "model": settings.model_name,
            "dtype": dtype,
            "engine": settings.engine,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "requests_per_stream": args.requests,
            "min_requests_per_round": args.min_requests,
            "results": {
                mode: [
                    {"streams": lv.streams, **(lv.summary() if lv.rounds else {}), "ttft_p50_by_round": lv.by_round(50)}
                    for lv in levels_
                ]
                for mode, levels_ in results.items()
            },
            "stages": {
                str(n): {name: {"p50": f[0], "p99": f[1], "n": f[2]} for name, f in stage_figures(rows).items()}
                for n, rows in stamps.items()
            },
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
