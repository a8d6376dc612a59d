"""Logs that follow a job: one line per request and per job state change, from the API
and the workers alike, each naming the job id, so `grep chatcmpl-...` across every
process's log tells a job's whole story.

    log_event(log, "job.started", job_id=..., model=..., key_id=..., attempt=1, queue_wait_s=0.012)

`setup_logging(settings, process)` sends every logger of the process (the service's,
Celery's, uvicorn's) through one handler on stderr, in one of two formats (LOG_FORMAT):

- `text` (the default, for humans): `2025-05-01 12:00:00,123 INFO api[4242] api.jobs.pipeline:
  job.created job_id=chatcmpl-... model=... key_id=key-...`, the event's fields as key=value
  after the message (values with spaces or quotes JSON-quoted);
- `json`: one JSON object per line with `ts` (UTC, ISO 8601), `level`, `logger`, `msg`,
  `process` (api, worker), `pid`, for an event `event` and its fields, and `exc` (the
  traceback) when there is one.

Keys never appear: callers name a key by its id (`key-` + 12 hex digits of its digest).
Prompt and completion text appear only with LOG_PROMPTS=true (`Settings.log_prompts`),
and then only in the fields added for it: `job.created`'s `messages` and the worker's
`job.ended` `completion`.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import sys
from datetime import UTC, datetime
from typing import Any

from common.jobs import JobRecord
from common.settings import Settings

# LogRecord attributes under which `log_event` hands its event to the formatters.
_EVENT = "llmq_event"
_FIELDS = "llmq_fields"
# Keys of a JSON line that an event's fields may not take (a field by that name is
# written as `field_<name>` instead).
_RESERVED = frozenset({"ts", "level", "logger", "msg", "process", "pid", "event", "exc"})
# Loggers of libraries that would otherwise write lines of their own format.
_ADOPTED = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def log_event(
    logger: logging.Logger,
    event: str,
    *,
    level: int = logging.INFO,
    exc_info: Any = None,
    **fields: Any,
) -> None:
    """One structured line: `event` as its message, `fields` (None values left out) as
    JSON keys or key=value pairs. Durations in seconds, rounded to the millisecond."""
    if not logger.isEnabledFor(level):
        return
    clean = {k: _clean(v) for k, v in fields.items() if v is not None}
    logger.log(level, event, exc_info=exc_info, extra={_EVENT: event, _FIELDS: clean})


def job_fields(record: JobRecord) -> dict[str, Any]:
    """What every line about a job names: its id, model, owner's key id and batch."""
    return {"job_id": record.id, "model": record.model, "key_id": record.owner or None, "batch_id": record.batch}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):  # JobStatus, ...
        return value.value
    return value


def event_of(record: logging.LogRecord) -> tuple[str | None, dict[str, Any]]:
    """The event name and fields `log_event` attached to a record (None, {} for a plain line)."""
    return getattr(record, _EVENT, None), getattr(record, _FIELDS, None) or {}


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        event, fields = event_of(record)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        if event is not None:
            out["event"] = event
        for key, value in fields.items():
            out[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


# A text field's value needs quoting when it holds one of these (one regex search, not a
# Python-level loop over its characters: this runs for every field of every line).
_NEEDS_QUOTES = re.compile(r"[\s\"'=]")


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        if value and _NEEDS_QUOTES.search(value) is None:
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The human format: time, level, process[pid], logger, message, then the event's
    fields as key=value."""

    def __init__(self, process: str):
        super().__init__(f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        _, fields = event_of(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours: replaced, not added to, when `setup_logging` runs again."""


_PER_TASK_INFO = ("celery.worker.strategy", "celery.app.trace")


def setup_logging(settings: Settings, process: str) -> logging.Handler:
    """Route every log line of this process (`api`, `worker`) through one handler on
    stderr in the configured format and level. Safe to call again (it replaces its own
    handler); other handlers on the root logger (a test's capture) are left in place."""
    formatter: logging.Formatter = JsonFormatter(process) if settings.log_format == "json" else TextFormatter(process)
    handler = _Handler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn writes through handlers of its own: through ours instead, one format per
    # process (its levels, e.g. `--log-level warning`, stay as set).
    for name in _ADOPTED:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    # The API's own `request` line (api/request_log.py) replaces uvicorn's access line.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Celery's per-task "received" and "succeeded in ...: <result repr>" lines repeat the
    # worker's own job.started / job.ended lines, at some 5% of a busy worker's CPU
    # (issue 12); they come back with LOG_LEVEL=DEBUG. Task failures are still logged.
    if root.level > logging.DEBUG:
        for name in _PER_TASK_INFO:
            logging.getLogger(name).setLevel(logging.WARNING)
    # Neither format names the caller's file, line or function, its thread or its process's
    # name: a record need not look them up (the logging HOWTO's "Optimization"). Finding
    # the caller walked the stack for 60 of a line's 100 us, and a job has a line or two
    # in the API and in the worker.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    return handler
