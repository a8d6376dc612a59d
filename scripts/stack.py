"""Start and stop the whole service locally: Redis, model worker(s), the API and Flower.

    python scripts/stack.py run        # what `make run` does; Ctrl-C stops everything

Ports come from REDIS_PORT, API_PORT and FLOWER_PORT. A Redis server already answering
on REDIS_PORT is used as it is; otherwise one is started (no persistence, under var/).
The integration tests and benchmarks start the same `Stack` on free ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None = None


@dataclass
class Stack:
    redis_port: int = 6379
    api_port: int = 8000
    flower_port: int | None = 5555
    workers: int = 1
    log_dir: Path | None = None  # None: processes write to this terminal
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    python: str = sys.executable

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.env)
        env["REDIS_URL"] = self.redis_url
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def spawn(self, name: str, args: list[str]) -> Proc:
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        # Own session: each service (and its children, e.g. vLLM's engine core) is one
        # process group that we can end without touching anything else.
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        proc = Proc(name, popen, out)
        self.procs.append(proc)
        return proc

    def start_redis(self) -> None:
        if redis_answers(self.redis_port):
            print(f"using the Redis server already on port {self.redis_port}", flush=True)
            return
        data = ROOT / "var" / f"redis-{self.redis_port}"
        data.mkdir(parents=True, exist_ok=True)
        self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
            ],
        )
        self._wait(lambda: redis_answers(self.redis_port), 20, "redis")

    def start_worker(self, name: str = "worker1", extra_env: dict[str, str] | None = None) -> Proc:
        env_args = [f"{k}={v}" for k, v in (extra_env or {}).items()]
        args = [
            self.python,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            # Mingle and gossip make every (re)connection to the broker wait for other
            # workers' replies; nothing here needs them (Flower works from task events).
            "--without-mingle",
            "--without-gossip",
        ]
        if env_args:
            args = ["env", *env_args, *args]
        return self.spawn(name, args)

    def start_api(self) -> Proc:
        return self.spawn(
            "api",
            [
                self.python,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                "0.0.0.0",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
        )

    def start_flower(self) -> Proc | None:
        if self.flower_port is None:
            return None
        return self.spawn(
            "flower",
            [
                self.python,
                "-m",
                "celery",
                f"--broker={self.redis_url}",
                "flower",
                f"--port={self.flower_port}",
                "--address=0.0.0.0",
            ],
        )

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.api_url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def wait_ready(self, model: str, workers: int = 1, timeout: float = 600) -> None:
        """Until the API answers and `model` has a live worker."""

        def ready() -> bool:
            self.check_alive()
            h = self.health()
            return bool(h and model in h.get("ready_models", []))

        self._wait(ready, timeout, f"API with a live worker for {model}")

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code is not None and not getattr(p, "expected_exit", False):
                raise RuntimeError(
                    f"{p.name} exited with {code}" + (f"; see {self.log_dir}/{p.name}.log" if self.log_dir else "")
                )

    def _wait(self, check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s")

    def stop_proc(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc.expected_exit = True  # type: ignore[attr-defined]
        # The service itself first, so it can shut down its children in order (a worker
        # finishes its jobs, then stops its engine core); the rest of its group after.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.popen.pid, sig)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
        # Children left behind in the group (e.g. an engine core) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        if proc.log:
            proc.log.close()

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name and p.popen.poll() is None)

    def kill(self, name: str) -> None:
        """SIGKILL a service and everything in its process group (a crash, for tests)."""
        proc = self.proc(name)
        proc.expected_exit = True  # type: ignore[attr-defined]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def restart(self, name: str) -> None:
        """Stop a service and start it again on the same port (redis or api)."""
        self.stop_proc(self.proc(name))
        if name == "redis":
            self.start_redis()
        elif name == "api":
            self.start_api()
        else:
            raise ValueError(name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self.stop_proc(proc)
        self.procs.clear()


def run() -> int:
    sys.path.insert(0, str(ROOT))
    from common.settings import get_settings

    settings = get_settings()
    stack = Stack(
        redis_port=int(os.environ.get("REDIS_PORT", 6379)),
        api_port=int(os.environ.get("API_PORT", 8000)),
        flower_port=int(os.environ.get("FLOWER_PORT", 5555)),
    )
    for port, what in ((stack.api_port, "API_PORT"), (stack.flower_port, "FLOWER_PORT")):
        if port is not None and port_open(port):
            print(f"port {port} ({what}) is already in use; set {what} to another port", file=sys.stderr)
            return 1
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Explicitly: a shell that starts us in the background may have left SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start_redis()
        stack.start_worker()
        stack.start_api()
        stack.start_flower()
        print("starting: the worker builds its engine first (about a minute on a CPU) ...", flush=True)
        stack.wait_ready(settings.model_name)
        print(
            f"\nready: API {stack.api_url}/v1 (model {settings.model_name}), "
            f"Flower http://127.0.0.1:{stack.flower_port}, Redis {stack.redis_url}. Ctrl-C stops everything.\n",
            flush=True,
        )
        while True:
            stack.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        print(__doc__)
        sys.exit(2)
    sys.exit(run())
