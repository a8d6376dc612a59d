"""The whole service on a Redis that speaks TLS only and requires client certificates (a
managed Redis with in-transit encryption): REDIS_URL=rediss://..., REDIS_TLS_CA_FILE,
REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE. A streamed and a plain chat through the API, the
fake engine's worker and Flower (its task events and its broker page) all over TLS."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port, make_tls_files  # noqa: E402

from common import keys  # noqa: E402

pytestmark = pytest.mark.integration
FAKE_MODEL = "SmolLM2-135M-Instruct"
FLOWER_AUTH = ("ops", "tls-secret")


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("redis-tls-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=free_port(),
        log_dir=logs,
        redis_tls=make_tls_files(logs / "tls"),
        env={
            "ENGINE": "fake",
            "FILES_DIR": str(logs / "files"),
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "API_KEYS": "",
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.start_flower()
        s.wait_ready(FAKE_MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def test_chat_streams_through_a_tls_redis(tls_stack):
    assert tls_stack.redis_url.startswith("rediss://")
    client = openai.OpenAI(base_url=tls_stack.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Say something."}]
    stream = client.chat.completions.create(model=FAKE_MODEL, messages=messages, max_tokens=16, stream=True)
    job_id, text, reasons = None, [], []
    for chunk in stream:
        job_id = chunk.id
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "".join(text) and reasons == ["length"]
    plain = client.chat.completions.create(model=FAKE_MODEL, messages=messages, max_tokens=8)
    assert plain.choices[0].message.content and plain.usage.completion_tokens == 8
    # Flower got the job's task events (sent by the API, received and run by the worker).
    flower = f"http://127.0.0.1:{tls_stack.flower_port}"
    deadline = time.monotonic() + 60
    state, resp = None, None
    while time.monotonic() < deadline:
        resp = httpx.get(f"{flower}/api/task/info/{job_id}", timeout=5, auth=FLOWER_AUTH)
        if resp.status_code == 200:
            state = resp.json().get("state")
            if state == "SUCCESS":
                break
        time.sleep(0.5)
    assert state == "SUCCESS", (job_id, resp and (resp.status_code, resp.text[:300]))
    # Its broker page reads the model's queue over TLS too.
    queues = httpx.get(f"{flower}/api/queues/length", timeout=10, auth=FLOWER_AUTH)
    assert queues.status_code == 200 and keys.chat_queue(FAKE_MODEL) in queues.text, queues.text
    # Redis itself: every client of the service came over TLS with a certificate (the
    # plain port is closed: `--port 0`).
    with tls_stack.redis_client() as r:
        assert r.config_get("port")["port"] == "0"
        assert int(r.config_get("tls-port")["tls-port"]) == tls_stack.redis_port
