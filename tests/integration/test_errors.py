"""Bad requests get OpenAI error objects with the right status, before anything is queued."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi"}]


def job_keys(redis) -> int:
    return sum(1 for _ in redis.scan_iter("llmq:job:*"))


@pytest.fixture
def nothing_queued(redis):
    before = job_keys(redis)
    yield
    assert job_keys(redis) == before, "a rejected request left a job behind"


def test_unknown_model_is_404(client, nothing_queued):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert exc.value.status_code == 404
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": -5}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages.0"),
        ({"stream_options": {"include_usage": True}}, None),
    ],
)
def test_invalid_parameters_are_400(client, model, kwargs, param, nothing_queued):
    args = {"model": model, "messages": HI, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**args)
    err = exc.value.body
    assert exc.value.status_code == 400 and err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert (err["param"] or "").startswith(param)


def test_prompt_longer_than_context_is_400(client, model, nothing_queued):
    long = [{"role": "user", "content": "Paris is lovely. " * 3000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=model, messages=long, stream=stream)
        assert exc.value.body["code"] == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_context_is_400(client, model, nothing_queued):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=HI, max_tokens=9000)
    assert exc.value.body["code"] == "context_length_exceeded" and exc.value.body["param"] == "max_tokens"


def test_malformed_json_is_400(http, nothing_queued):
    resp = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_missing_model_and_unknown_route(http, nothing_queued):
    resp = http.post("/v1/chat/completions", json={"messages": HI})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
