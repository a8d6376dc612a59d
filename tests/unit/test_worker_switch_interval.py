"""The worker process runs with WORKER_SWITCH_INTERVAL_MS as its interpreter switch
interval (1 ms unless set; Python's own is 5 ms), from the moment its Celery app is
imported, before any thread of its own starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _interval(extra_env: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "WORKER_SWITCH_INTERVAL_MS"}
    env.update(extra_env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", "import sys, worker.celery_app; print(sys.getswitchinterval())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_the_worker_process_takes_its_switch_interval_from_the_settings():
    assert abs(_interval({}) - 0.001) < 1e-9
    assert abs(_interval({"WORKER_SWITCH_INTERVAL_MS": "2.5"}) - 0.0025) < 1e-9
