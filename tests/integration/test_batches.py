"""The Files and Batch APIs through the official `openai` client, on the real engine,
and the `llmq` CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def line(custom_id: str, model: str, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": FRANCE, "temperature": 0, "max_tokens": 12, **body},
    }


def jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client, lines) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id


def run_batch(client, lines, **kw):
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def wait_batch(client, batch_id, statuses=("completed", "failed", "cancelled", "expired"), timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} stuck in {batch.status}")


def read_jsonl(client, file_id) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def test_files_api(client):
    data = jsonl([line("a", "m")])
    f = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.filename == "requests.jsonl"
    assert f.purpose == "batch" and f.object == "file"
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.retrieve(f.id).bytes == len(data)
    assert client.files.content(f.id).content == data
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="nonsense")


def test_batch_runs_every_line_once(client, model):
    lines = [line(f"ok-{i}", model) for i in range(8)]
    lines.insert(3, line("too-hot", model, temperature=5))
    lines.append(line("no-model", "no-such-model"))
    batch = run_batch(client, lines, metadata={"team": "eval"})
    assert batch.status == "validating" and batch.metadata == {"team": "eval"}
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 8, 2)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"ok-{i}" for i in range(8))
    for o in out:
        assert o["response"]["status_code"] == 200 and o["error"] is None
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and "Paris" in body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
    errors = {e["custom_id"]: e for e in read_jsonl(client, batch.error_file_id)}
    assert errors["too-hot"]["response"]["status_code"] == 400
    assert errors["too-hot"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["no-model"]["response"]["status_code"] == 404
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


@pytest.mark.parametrize(
    "lines,code,line_no",
    [
        (["{not json"], "invalid_json_line", 1),
        (
            [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}, "oops"],
            "invalid_json_line",
            2,
        ),
        ([{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}], "invalid_method", 1),
        ([{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}], "invalid_url", 1),
        ([{"method": "POST", "url": "/v1/chat/completions", "body": {}}], "invalid_request", 1),
    ],
)
def test_malformed_input_fails_the_batch_naming_the_line(client, model, lines, code, line_no):
    batch = wait_batch(client, run_batch(client, lines).id)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors.data[0].code == code and batch.errors.data[0].line == line_no


def test_duplicates_and_too_many_lines(client, model):
    dup = wait_batch(client, run_batch(client, [line("x", model), line("y", model), line("x", model)]).id)
    assert dup.status == "failed" and dup.errors.data[0].code == "duplicate_custom_id" and dup.errors.data[0].line == 3
    limit = int(os.environ.get("BATCH_MAX_LINES_FOR_TESTS", "300"))
    many = wait_batch(client, run_batch(client, [line(f"l{i}", model) for i in range(limit + 1)]).id)
    assert many.status == "failed" and many.errors.data[0].code == "too_many_lines"


def test_create_batch_errors(client, model):
    file_id = upload(client, [line("a", model)])
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_cancel_mid_run_keeps_what_finished(client, model):
    lines = [line(f"short-{i}", model, max_tokens=2) for i in range(4)]
    lines += [line(f"long-{i}", model, max_tokens=3000, extra_body=None, ignore_eos=True) for i in range(60)]
    for x in lines:
        x["body"].pop("extra_body", None)
    batch = run_batch(client, lines)
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    t0 = time.monotonic()
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id, statuses=("cancelled",), timeout=30)
    assert time.monotonic() - t0 < 15
    assert batch.cancelled_at and batch.cancelling_at
    out = read_jsonl(client, batch.output_file_id)
    assert {o["custom_id"] for o in out} >= {f"short-{i}" for i in range(4)}
    errors = read_jsonl(client, batch.error_file_id)
    assert len(out) + len(errors) == 64
    assert len({e["custom_id"] for e in errors} | {o["custom_id"] for o in out}) == 64
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors if e["response"] is None)
    with pytest.raises(openai.APIStatusError):
        client.batches.cancel(wait_batch(client, run_batch(client, [line("z", model)]).id).id)


def test_interactive_chat_goes_first_while_a_batch_runs(client, model, stack):
    """With a large batch in flight, a new streaming request still starts at once."""

    def ttft() -> float:
        t0 = time.monotonic()
        stream = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=8, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - t0
                break
        stream.close()
        return first

    idle = ttft()
    lines = [line(f"bulk-{i}", model, max_tokens=64, ignore_eos=True) for i in range(150)]
    batch = run_batch(client, lines)
    while client.batches.retrieve(batch.id).status != "in_progress":
        time.sleep(0.2)
    time.sleep(3)  # the workers' batch share is full by now
    busy = sorted(ttft() for _ in range(3))[1]
    progress = client.batches.retrieve(batch.id).request_counts
    print(f"\nTTFT idle {idle:.3f} s, with a 150-line batch running {busy:.3f} s ({progress.completed} lines done)")
    assert progress.completed < 150  # the batch was still running
    # Draining the batch would take tens of seconds; a few engine steps is well under 3 s.
    assert busy < 3.0
    client.batches.cancel(batch.id)
    wait_batch(client, batch.id, statuses=("cancelled",), timeout=60)


def test_cli_submits_watches_and_downloads(stack, model, tmp_path, api_key):
    src = tmp_path / "requests.jsonl"
    src.write_bytes(jsonl([line(f"cli-{i}", model) for i in range(5)]))
    env = dict(os.environ, LLMQ_BASE_URL=stack.api_url + "/v1", OPENAI_API_KEY=api_key)
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "batch", "submit", str(src), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "5/5 (5 done, 0 failed)" in done.stderr and "lines/s" in done.stderr and "ETA" in done.stderr
    outputs = list((tmp_path / "out").glob("*_output.jsonl"))
    assert len(outputs) == 1
    results = [json.loads(x) for x in outputs[0].read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"cli-{i}" for i in range(5)]
    batch_id = outputs[0].name.removesuffix("_output.jsonl")
    status = subprocess.run(
        [sys.executable, "-m", "api.cli", "batch", "status", batch_id], env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed"
    assert httpx.get(stack.api_url + "/health").json()["status"] == "ok"


def test_batch_past_its_window_expires_with_what_finished(client, model, redis):
    lines = [line(f"s-{i}", model, max_tokens=2) for i in range(3)]
    lines += [line(f"l-{i}", model, max_tokens=3000, ignore_eos=True) for i in range(30)]
    batch = run_batch(client, lines)
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # Fast-forward: the 24 h window ends now.
    redis.hset(f"llmq:batch:{batch.id}", "expires_at", json.dumps(int(time.time()) - 1))
    batch = wait_batch(client, batch.id, statuses=("expired",), timeout=60)
    assert batch.expired_at and batch.request_counts.completed >= 3
    out = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    assert len(out) + len(errors) == 33
    assert any(e["error"] and e["error"]["code"] == "batch_expired" for e in errors)


# -- the runner's group hand-out, on the fake engine ---------------------------------------


@pytest.fixture(scope="module")
def fake_stack(tmp_path_factory):
    """Its own stack: one fake-engine worker with 8 slots (6 for batch lines), 0.2 s a step,
    so a batch of a few hundred lines runs long enough to crash the API mid-run."""
    from tests.integration.conftest import MODEL, Stack, free_port

    logs = tmp_path_factory.mktemp("batch-fake-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.2",
            "WORKER_SLOTS": "8",
            "BATCH_SLOT_SHARE": "0.75",
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def test_lines_go_out_in_groups_within_the_slots_once_each_across_an_api_crash(fake_stack):
    """Lines are handed out in groups, never more in flight than the batch share of slots
    (6 of 8), invalid lines anywhere in a group fail in place, and an API SIGKILLed mid-run
    (possibly between writing a group and marking it handed out) loses no line and runs
    none twice: every line's job has exactly one attempt and one output."""
    import redis as redis_lib

    from api.batches.input import line_job_id
    from common import keys
    from common.settings import get_settings

    model = get_settings().model_name
    bad = {5, 150, 299}
    lines = [line(f"g-{i}", model, max_tokens=16, ignore_eos=True) for i in range(300)]
    for i in bad:
        lines[i]["body"]["temperature"] = 5
    c = openai.OpenAI(base_url=fake_stack.api_url + "/v1", api_key="unused", max_retries=2, timeout=60)
    batch = run_batch(c, lines)
    r = redis_lib.Redis.from_url(fake_stack.redis_url)
    # The lines really in flight (their records queued or running), counted in one
    # atomic step; not the slot set, which the reserve script bounds by construction.
    live = r.register_script(
        "local n = 0 for _, k in ipairs(KEYS) do local s = redis.call('HGET', k, 'status') "
        "if s == 'queued' or s == 'in_progress' then n = n + 1 end end return n"
    )
    line_keys = [keys.job(line_job_id(batch.id, "/v1/chat/completions", i)) for i in range(300)]
    in_flight: list[int] = []

    def watch_until(done) -> None:
        deadline = time.monotonic() + 240
        while not done():
            assert time.monotonic() < deadline, c.batches.retrieve(batch.id)
            in_flight.append(int(live(keys=line_keys)))
            time.sleep(0.05)

    watch_until(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 40)
    fake_stack.restart("api", signal.SIGKILL)
    fake_stack.wait_ready(model, timeout=120)
    watch_until(lambda: c.batches.retrieve(batch.id).status in ("completed", "failed", "cancelled", "expired"))
    final = c.batches.retrieve(batch.id)
    assert final.status == "completed"
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (300, 297, 3)
    assert max(in_flight) == 6 and all(n <= 6 for n in in_flight)
    out = read_jsonl(c, final.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"g-{i}" for i in range(300) if i not in bad)
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 16 for o in out)
    errors = read_jsonl(c, final.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"g-{i}" for i in bad)
    assert all(e["response"]["body"]["error"]["param"] == "temperature" for e in errors)
    # Each valid line ran once: one attempt, never a second.
    ids = [line_job_id(batch.id, "/v1/chat/completions", i) for i in range(300) if i not in bad]
    attempts = [r.hget(keys.job(job_id), "attempt") for job_id in ids]
    assert set(attempts) == {b"1"}, sorted(set(attempts))
    assert r.hget(keys.batch(batch.id), "n_dispatched") == b"300"


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_a_stopped_batch_ends_every_line_and_frees_its_slots(fake_stack, how):
    """Cancelled (or past its window) mid-run: the lines in flight are cancelled, those
    never handed out are never run, every line has exactly one outcome, and the batch's
    slots are all given back."""
    import redis as redis_lib

    from api.batches.input import line_job_id
    from common import keys
    from common.settings import get_settings

    model = get_settings().model_name
    lines = [line(f"s-{i}", model, max_tokens=64, ignore_eos=True) for i in range(120)]
    c = openai.OpenAI(base_url=fake_stack.api_url + "/v1", api_key="unused", max_retries=2, timeout=60)
    batch = run_batch(c, lines)
    deadline = time.monotonic() + 120
    while c.batches.retrieve(batch.id).request_counts.completed < 6:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = redis_lib.Redis.from_url(fake_stack.redis_url)

    def just_handed_out() -> bool:
        """Lines queued, or started under 0.4 s ago (a line runs 1.6 s here)."""
        handed = int(r.hget(keys.batch(batch.id), "n_dispatched") or 0)
        for i in range(handed):
            status, started = r.hmget(keys.job(line_job_id(batch.id, batch.endpoint, i)), "status", "started")
            if status == b"queued" or (status == b"in_progress" and time.time() - float(started) < 0.4):
                return True
        return False

    # Lines in flight, with most of their run ahead, when it stops. (The 6 slots' lines
    # start in one engine step and end in one: a stop that lands between one group's end
    # and the next group's start finds none in flight, as a fresh-clone CI run did.)
    while not just_handed_out():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if how == "cancel":
        c.batches.cancel(batch.id)
        final = wait_batch(c, batch.id, statuses=("cancelled",), timeout=60)
    else:
        r.hset(keys.batch(batch.id), "expires_at", json.dumps(int(time.time()) - 1))
        final = wait_batch(c, batch.id, statuses=("expired",), timeout=60)
    out = read_jsonl(c, final.output_file_id)
    errors = read_jsonl(c, final.error_file_id)
    assert len(out) >= 6 and len(out) + len(errors) == 120
    assert len({x["custom_id"] for x in out + errors}) == 120
    code = "batch_cancelled" if how == "cancel" else "batch_expired"
    assert all(e["error"]["code"] == code for e in errors if e["response"] is None)
    assert any(e["response"] is None for e in errors)  # lines never handed out
    dispatched = int(r.hget(keys.batch(batch.id), "n_dispatched"))
    assert dispatched < 120
    statuses = {r.hget(keys.job(line_job_id(batch.id, batch.endpoint, i)), "status") for i in range(dispatched)}
    assert statuses <= {b"completed", b"cancelled"}, statuses
    if how == "cancel":
        # The lines in flight when it was cancelled were cancelled, not left to run to
        # their end. (A window that ends is seen at the runner's next turn: by then the
        # lines in flight may all have finished.)
        assert b"cancelled" in statuses, statuses
    assert not [m for m in r.smembers(keys.batch_slots(model)) if batch.id.removeprefix("batch_") in m.decode()]
