"""Process supervision: a worker that cannot build its engine exits at once instead of
taking (and failing) jobs, and `make run` (scripts/stack.py run) restarts a service that
died while leaving the others running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import redis as redis_lib

from common import keys
from common.job_queue import JobQueue
from common.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = get_settings().model_name
STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"not seen within {timeout:.0f} s: {what}")


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_worker_that_cannot_start_its_engine_exits_non_zero(tmp_path: Path) -> None:
    s = Stack(
        redis_port=free_port(),
        flower_port=None,
        log_dir=tmp_path,
        env={"MODEL_PATH": "/nonexistent", "ENGINE": "vllm", "HF_HUB_OFFLINE": "1", "FILES_DIR": str(tmp_path)},
    )
    try:
        s.start_redis()
        r = redis_lib.Redis.from_url(s.redis_url)
        queue = keys.chat_queue(MODEL)
        job_id = f"chatcmpl-{uuid.uuid4().hex}"
        jq = JobQueue(s.redis_url, 120)
        try:
            asyncio.run(jq.submit(job_id, MODEL))
        finally:
            jq.close()
        assert r.llen(queue) == 1

        worker = s.start_worker()

        def exited() -> bool:
            # A worker that consumes its queue instead of exiting fails here at once.
            assert r.llen(queue) == 1, "the worker took the waiting message although it has no engine"
            return worker.popen.poll() is not None

        wait_until(exited, 300, "the worker exiting")
        worker.expected_exit = True  # type: ignore[attr-defined]
        log = (tmp_path / "worker1.log").read_text(errors="replace")
        assert worker.popen.returncode not in (0, None), log[-3000:]
        assert r.llen(queue) == 1
        assert not r.exists("unacked"), "the message was taken and is waiting for redelivery"
        assert "/nonexistent" in log
    finally:
        s.stop()


def test_make_run_restarts_a_killed_worker_and_keeps_the_api(tmp_path: Path) -> None:
    api_port = free_port()
    env = dict(os.environ)
    env.update(
        ENGINE="fake",
        REDIS_PORT=str(free_port()),
        API_PORT=str(api_port),
        FLOWER_PORT=str(free_port()),
        FILES_DIR=str(tmp_path / "files"),
        PYTHONUNBUFFERED="1",
    )
    out_path = tmp_path / "run.out"
    with open(out_path, "ab") as out:
        launcher = subprocess.Popen(
            [sys.executable, "scripts/stack.py", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output() -> str:
        return out_path.read_text(errors="replace")

    def pids(name: str) -> list[int]:
        return [int(pid) for n, pid in STARTED.findall(output()) if n == name]

    def serving() -> int:
        return len(re.findall(rf"worker \S+ serving {re.escape(MODEL)}", output()))

    try:

        def ready() -> bool:
            assert launcher.poll() is None, f"the launcher exited with {launcher.returncode}:\n{output()[-3000:]}"
            return "ready: API" in output()

        wait_until(ready, 300, "the launcher's ready banner")
        assert re.search(r"ready: API.*restarted", output(), re.S), "the banner does not mention restarts"
        [worker_pid] = pids("worker1")
        api_pids = pids("api")  # the API that answered (more than one if it crashed at start)
        assert serving() == 1

        os.killpg(worker_pid, signal.SIGKILL)

        wait_until(lambda: "worker1 exited with -9; restarting in" in output(), 60, "the restart message")
        wait_until(lambda: len(pids("worker1")) == 2, 60, "a new worker1")
        new_worker_pid = pids("worker1")[1]
        assert new_worker_pid != worker_pid and alive(new_worker_pid)
        wait_until(lambda: serving() == 2, 120, "the new worker serving the model")

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0, timeout=60)
        wait_until(lambda: MODEL in [m.id for m in client.models.list().data], 60, "the model listed again")
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.completion_tokens > 0

        # The API was left alone: same process, never restarted.
        assert pids("api") == api_pids and alive(api_pids[-1])
        assert launcher.poll() is None
    finally:
        started = [int(pid) for _, pid in STARTED.findall(output())]
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        left = [pid for pid in started if alive(pid)]
        # Whatever happened above, leave nothing running.
        for pid in [launcher.pid, *started]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(10)
    assert code == 0, output()[-3000:]
    assert started and not left, f"still running after the launcher stopped: {left}"
