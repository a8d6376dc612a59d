"""Structured logs (common/logs.py): the JSON and text formats, `setup_logging`, and the
prompt kept out of `job.created` unless LOG_PROMPTS is on."""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import pytest

from api.auth import Principal
from api.endpoints.chat import ChatAdapter
from api.jobs.pipeline import JobPipeline, MessageGroups
from common.errors import OverloadedError
from common.jobs import JobOptions, JobRecord, JobRequest, SamplingSpec
from common.logs import JsonFormatter, TextFormatter, job_fields, log_event, setup_logging
from common.schemas import ChatCompletionRequest
from common.settings import Settings

PROMPT = "the secret plans of the castle"


@pytest.fixture
def capture():
    """A handler on the root logger, in a given format, into a string; removed after."""
    root = logging.getLogger()
    level = root.level
    added: list[logging.Handler] = []

    def attach(formatter: logging.Formatter) -> io.StringIO:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        added.append(handler)
        return out

    yield attach
    for handler in added:
        root.removeHandler(handler)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def record(**kw) -> JobRecord:
    return JobRecord(
        id="chatcmpl-abc",
        model="m",
        owner="key-0123456789ab",
        request=JobRequest(prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=7, n=2)),
        options=JobOptions(stream=True),
        **kw,
    )


def test_a_json_line_has_the_base_keys_and_the_event_fields(capture):
    out = capture(JsonFormatter("worker"))
    log_event(
        logging.getLogger("llmq.test"),
        "job.ended",
        **job_fields(record()),
        status="completed",
        duration_s=1.23456,
        completion_tokens=5,
        error=None,  # None: left out
        msg="a field named like a base key",
    )
    (line,) = lines(out)
    assert line["event"] == line["msg"] == "job.ended"
    assert (line["level"], line["logger"], line["process"]) == ("INFO", "llmq.test", "worker")
    assert isinstance(line["pid"], int) and line["ts"].endswith("Z")
    assert line["job_id"] == "chatcmpl-abc" and line["model"] == "m" and line["key_id"] == "key-0123456789ab"
    assert line["status"] == "completed" and line["completion_tokens"] == 5
    assert line["duration_s"] == 1.235  # seconds, to the millisecond
    assert "error" not in line and "batch_id" not in line
    assert line["field_msg"] == "a field named like a base key"


def test_a_traceback_stays_inside_its_one_json_line(capture):
    out = capture(JsonFormatter("api"))
    try:
        raise ValueError("boom")
    except ValueError as exc:
        log_event(logging.getLogger("llmq.test"), "job.ended", level=logging.ERROR, exc_info=exc, status="failed")
    assert len(out.getvalue().splitlines()) == 1
    (line,) = lines(out)
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc"] and "Traceback" in line["exc"]


def test_plain_log_lines_are_json_too(capture):
    out = capture(JsonFormatter("api"))
    logging.getLogger("llmq.test").warning("worker %s serving %s", "w1", "m")
    (line,) = lines(out)
    assert line["msg"] == "worker w1 serving m" and "event" not in line


def test_the_text_format_is_a_readable_line_with_key_value_fields(capture):
    out = capture(TextFormatter("api"))
    log_event(
        logging.getLogger("llmq.test"),
        "job.refused",
        model="m",
        key_id="key-0123456789ab",
        status=429,
        stream=False,
        message="the queue is full",
        errors=["a", "b"],
    )
    text = out.getvalue()
    assert text.count("\n") == 1
    assert " INFO api[" in text and " llmq.test: job.refused model=m key_id=key-0123456789ab status=429" in text
    assert 'stream=false message="the queue is full" errors=["a","b"]' in text


def test_setup_logging_installs_one_handler_in_the_chosen_format(monkeypatch):
    root = logging.getLogger()
    # Another test may have set up logging already (importing api.main does): not ours to count.
    before, level = [h for h in root.handlers if type(h).__name__ != "_Handler"], root.level
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    try:
        setup_logging(Settings(log_format="text"), "api")
        setup_logging(Settings(log_format="json", log_level="warning"), "api")  # again: replaces its own
        assert [h for h in root.handlers if h not in before] == [handler for handler in root.handlers[-1:]]
        assert root.level == logging.WARNING
        log_event(logging.getLogger("llmq.test"), "request", status=200)  # below WARNING: dropped
        logging.getLogger("uvicorn.error").error("uvicorn says %s", "hi")  # through ours, as JSON
        (line,) = lines(out)
        assert line["msg"] == "uvicorn says hi" and line["logger"] == "uvicorn.error" and line["process"] == "api"
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_celerys_per_task_info_lines_are_quiet_unless_debugging(monkeypatch):
    """Celery's "received" / "succeeded in" lines repeat job.started / job.ended (issue 12:
    some 5% of a busy worker's CPU); LOG_LEVEL=DEBUG brings them back."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    names = ("celery.worker.strategy", "celery.app.trace")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        setup_logging(Settings(log_level="info"), "worker")
        assert all(not logging.getLogger(n).isEnabledFor(logging.INFO) for n in names)
        assert all(logging.getLogger(n).isEnabledFor(logging.ERROR) for n in names)  # failures still logged
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        setup_logging(Settings(log_level="debug"), "worker")
        assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in names)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_records_skip_what_no_format_shows(monkeypatch):
    """Neither format shows the caller's file, line or function, a thread or a process
    name: after setup_logging a record does not look them up (walking the stack for the
    caller was 60 of a line's 100 us), and the lines still carry all they show."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    saved = (logging._srcfile, logging.logThreads, logging.logMultiprocessing)  # type: ignore[attr-defined]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    try:
        setup_logging(Settings(log_format="json"), "worker")
        root.addHandler(keep)
        log_event(logging.getLogger("llmq.test"), "job.started", job_id="chatcmpl-1", attempt=1)
        (record,) = seen
        assert record.funcName == "(unknown function)" and record.lineno == 0
        assert record.threadName is None and record.processName is None
        (line,) = lines(out)
        assert line["event"] == "job.started" and line["job_id"] == "chatcmpl-1" and line["pid"] == os.getpid()
        assert line["process"] == "worker" and line["logger"] == "llmq.test" and line["level"] == "INFO"
    finally:
        logging._srcfile, logging.logThreads, logging.logMultiprocessing = saved  # type: ignore[attr-defined]
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_text_values_are_quoted_only_when_they_must_be(capture):
    out = capture(TextFormatter("api"))
    log_event(logging.getLogger("llmq.test"), "x", a="plain", b="two words", c='q"uote', d="k=v", e="tab\tx", f="")
    assert 'a=plain b="two words" c="q\\"uote" d="k=v" e="tab\\tx" f=""' in out.getvalue()


def test_log_level_must_be_a_level_name():
    assert Settings(log_level="debug").log_level == "debug"
    with pytest.raises(ValueError):
        Settings(log_level="loud")


# -- the prompt in job.created --------------------------------------------------------


class FakeStore:
    async def create(self, record, ttl=None, max_waiting=0, max_active=0):
        return 1, 0


class FakeQueue:
    def __init__(self):
        self.sent: list[str] = []

    async def submit(self, job_id, model, priority):
        self.sent.append(job_id)


class FakeAdmission:
    def __init__(self, refuse: bool = False):
        self.refuse = refuse

    async def count_request(self, caller):
        if self.refuse:
            raise OverloadedError("The model 'm' is overloaded", headers={"retry-after": "3"})
        return {}

    async def queue_limit(self, model):
        return 0


def adapter(settings: Settings, refuse: bool = False) -> tuple[ChatAdapter, FakeQueue]:
    """A ChatAdapter on a real JobPipeline whose Redis sides are fakes; `prepare` makes a
    record without a tokenizer."""
    pipeline = object.__new__(JobPipeline)
    queue = FakeQueue()
    pipeline.settings, pipeline.store, pipeline.queue = settings, FakeStore(), queue  # type: ignore[assignment]
    pipeline.messages = MessageGroups(queue)  # type: ignore[arg-type]
    pipeline.admission = FakeAdmission(refuse)  # type: ignore[assignment]

    async def look(model, headers=None):
        return None

    pipeline.look = look  # type: ignore[method-assign]

    class Adapter(ChatAdapter):
        async def prepare(self, req, job_id=None, owner=""):
            return JobRecord(
                id="chatcmpl-p",
                model=req.model,
                owner=owner,
                request=JobRequest(prompt_token_ids=[1, 2, 3, 4], sampling=SamplingSpec(max_tokens=9)),
                options=JobOptions(background=True),
            )

    return Adapter(settings, pipeline, catalog=None), queue  # type: ignore[arg-type]


def chat_request() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "background": True, "messages": [{"role": "user", "content": PROMPT}]}
    )


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_job_created_has_the_prompt_only_when_enabled(capture, log_prompts):
    out = capture(JsonFormatter("api"))
    chat, queue = adapter(Settings(log_prompts=log_prompts))
    await chat.submit(chat_request(), Principal("key-0123456789ab"))
    assert queue.sent == ["chatcmpl-p"]
    created = [line for line in lines(out) if line.get("event") == "job.created"]
    assert len(created) == 1
    line = created[0]
    assert line["job_id"] == "chatcmpl-p" and line["key_id"] == "key-0123456789ab" and line["model"] == "m"
    assert (line["prompt_tokens"], line["max_tokens"], line["n"], line["background"]) == (4, 9, 1, True)
    if log_prompts:
        assert line["messages"] == [{"role": "user", "content": PROMPT}]
    else:
        assert "messages" not in line and PROMPT not in out.getvalue()


async def test_a_refused_request_is_logged_without_a_job(capture):
    out = capture(JsonFormatter("api"))
    chat, queue = adapter(Settings(log_prompts=True), refuse=True)
    with pytest.raises(OverloadedError):
        await chat.submit(chat_request(), Principal("key-0123456789ab"))
    (line,) = [line for line in lines(out) if line.get("event")]
    assert line["event"] == "job.refused" and line["reason"] == "engine_overloaded" and line["status"] == 429
    assert line["key_id"] == "key-0123456789ab" and line["retry_after"] == "3" and "job_id" not in line
    assert queue.sent == [] and PROMPT not in out.getvalue()


# -- the worker's end of a job ----------------------------------------------------------


def test_a_failed_jobs_end_has_its_error_timings_and_traceback_and_a_refused_end_is_lost(capture):
    from common.jobs import JobStatus
    from worker.runtime import WorkerRuntime

    runtime = object.__new__(WorkerRuntime)
    runtime.worker_id = "w1/1-abc"
    out = capture(JsonFormatter("worker"))
    job = record(created=100.0, started=101.0)
    try:
        raise RuntimeError("the engine broke")
    except RuntimeError as exc:
        runtime._log_end(job, 2, JobStatus.failed, 104.5, error_code="engine_error", error="boom", exc_info=exc)
    runtime._log_end(job, 2, None, 104.5)
    ended, lost = lines(out)
    assert ended["event"] == "job.ended" and ended["level"] == "ERROR" and ended["status"] == "failed"
    assert (ended["attempt"], ended["duration_s"], ended["total_s"]) == (2, 3.5, 4.5)
    assert ended["error_code"] == "engine_error" and "RuntimeError: the engine broke" in ended["exc"]
    assert ended["job_id"] == "chatcmpl-abc" and ended["key_id"] == "key-0123456789ab" and ended["worker"] == "w1/1-abc"
    assert lost["event"] == "job.lost" and lost["level"] == "WARNING" and lost["job_id"] == "chatcmpl-abc"
