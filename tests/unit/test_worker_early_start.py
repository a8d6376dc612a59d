"""A chat job starts on the worker's engine loop as the Celery consumer receives its
message (the `task_received` signal), not once a slot thread has taken its task; a group
message (batch lines) or a message with an ETA does not, and a revoked one is forgotten.
Run in a subprocess: importing the worker's Celery app connects its signals for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
from types import SimpleNamespace
from celery import signals
import worker.celery_app as app
from common import keys

calls = []

class Runtime:
    def start_early(self, job_id):
        calls.append(["start", job_id])
    def forget_early(self, job_id):
        calls.append(["forget", job_id])

app._runtime = Runtime()

def req(name, args, eta=None):
    return SimpleNamespace(name=name, args=args, eta=eta, id="t-" + str(len(calls)))

signals.task_received.send(sender=None, request=req(keys.CHAT_TASK, ["chatcmpl-a"]))
signals.task_received.send(sender=None, request=req(keys.CHAT_GROUP_TASK, [["chatcmpl-b", "chatcmpl-c"]]))
signals.task_received.send(sender=None, request=req(keys.CHAT_TASK, ["chatcmpl-d"], eta="2030-01-01T00:00:00"))
signals.task_received.send(sender=None, request=req(keys.CHAT_TASK, [123]))
signals.task_received.send(sender=None, request=req(keys.CHAT_TASK, ["chatcmpl-e", "extra"]))
signals.task_revoked.send(sender=None, request=req(keys.CHAT_TASK, ["chatcmpl-a"]))
print(json.dumps(calls))
"""


def test_a_chat_message_starts_its_job_as_it_is_received():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    calls = json.loads(out.stdout.strip().splitlines()[-1])
    assert calls == [["start", "chatcmpl-a"], ["forget", "chatcmpl-a"]]
