"""Request limits against hostile input (api/limits.py and the schema's validators), on
tiny ASGI apps and in process: no services."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.testclient import TestClient

from api.endpoints.chat import ChatAdapter
from api.errors import _validation_error, error_response, install_error_handlers
from api.limits import (
    MULTIPART_SLACK,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    check_chat_limits,
    header_bytes,
    install_limits,
    json_body_error,
    json_too_deep,
)
from common.errors import InvalidRequestError
from common.schemas import INT64_MAX, INT64_MIN, ChatCompletionRequest, find_lone_surrogate
from common.settings import Settings

MSG = [{"role": "user", "content": "hi"}]
LIMIT = 64 * 1024


def req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


# -- a tiny ASGI harness ------------------------------------------------------------------


class Echo:
    """An app that reads the whole body and answers with its length."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = json.dumps({"len": len(self.body)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


class FailingReader(Echo):
    """An app that answers 400 when reading its body fails, as a form parser would."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"bad body"})


async def call(
    app,
    chunks: list[bytes],
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    headers: list[tuple[bytes, bytes]] | None = None,
    content_length: bool = True,
) -> tuple[int, dict[str, Any] | None, int]:
    """Send a request in `chunks`; the status, the JSON answer and how many chunks were read."""
    hdrs = list(headers if headers is not None else [(b"content-type", b"application/json")])
    if content_length:
        hdrs.append((b"content-length", str(sum(map(len, chunks))).encode()))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "headers": hdrs,
    }
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive():
        nonlocal read
        if pending:
            read += 1
            return pending.pop(0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        answer = json.loads(body) if body else None
    except ValueError:
        answer = {"raw": body.decode()}
    return sent[0]["status"], answer, read


def limited(app, limit: int = LIMIT, upload: int = 4 * LIMIT) -> BodyLimitMiddleware:
    return BodyLimitMiddleware(app, max_bytes=limit, upload_max_bytes=upload, max_json_depth=64)


def error(answer: dict[str, Any] | None) -> dict[str, Any]:
    assert answer is not None and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]


# -- body size ----------------------------------------------------------------------------


async def test_a_body_over_the_limit_by_its_content_length_is_refused_unread():
    app = Echo()
    status, answer, read = await call(limited(app), [b"x" * (LIMIT + 1)])
    assert status == 413 and error(answer)["code"] == "request_too_large"
    assert read == 0 and not app.called


async def test_a_streamed_body_is_cut_off_as_soon_as_it_passes_the_limit():
    """No Content-Length (chunked): reading stops at the chunk that passes the limit."""
    app = Echo()
    chunks = [b"x" * 1024] * 1000  # 1000 KiB against a 64 KiB limit
    status, answer, read = await call(limited(app), chunks, content_length=False)
    assert status == 413 and error(answer)["code"] == "request_too_large"
    assert read == LIMIT // 1024 + 1 and not app.called


async def test_a_streamed_non_json_body_over_the_limit_gets_a_413_not_the_apps_answer():
    app = FailingReader()
    chunks = [b"x" * 1024] * 1000
    status, answer, read = await call(
        limited(app), chunks, headers=[(b"content-type", b"application/octet-stream")], content_length=False
    )
    assert status == 413 and error(answer)["code"] == "request_too_large"
    assert read == LIMIT // 1024 + 1


async def test_a_body_within_the_limit_reaches_the_app_whole():
    app = Echo()
    body = json.dumps({"model": "m", "messages": MSG, "pad": "y" * (LIMIT - 100)}).encode()
    assert len(body) <= LIMIT
    status, answer, _ = await call(limited(app), [body[:1000], body[1000:]])
    assert status == 200 and answer == {"len": len(body)} and app.body == body


async def test_uploads_have_the_upload_limit_but_json_to_the_upload_path_does_not():
    multipart = [(b"content-type", b"multipart/form-data; boundary=x")]
    big = [b"x" * (2 * LIMIT)]
    status, answer, _ = await call(limited(Echo()), big, path="/v1/files", headers=multipart)
    assert status == 200 and answer == {"len": 2 * LIMIT}
    too_big = [b"x" * (4 * LIMIT + MULTIPART_SLACK + 1)]
    status, answer, _ = await call(limited(Echo()), too_big, path="/v1/files", headers=multipart)
    assert status == 413
    status, _, _ = await call(limited(Echo()), big, path="/v1/files")  # JSON: the ordinary limit
    assert status == 413
    status, _, _ = await call(limited(Echo()), big, path="/v1/batches", headers=multipart)
    assert status == 413


# -- JSON bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,deep",
    [
        (b'{"a": [1, {"b": [2]}]}', False),
        (b"[" * 64 + b"]" * 64, False),
        (b"[" * 65 + b"]" * 65, True),
        (b'{"a":' * 65 + b"1" + b"}" * 65, True),
        (b"[" * 100_000, True),  # never closed
        (b'{"a": "' + b"[" * 1000 + b'"}', False),  # brackets in a string
        (b'{"a": "\\"' + b"[" * 1000 + b'"}', False),  # ... after an escaped quote
        (b'{"a": "\\\\\\"' + b"[" * 1000 + b'"}', False),  # ... after \\ and \"
        (b'{"a": "\\\\", "b": ' + b"[" * 65 + b"]" * 65 + b"}", True),  # a string ending in \\
        ((b"[" * 60 + b"]" * 60 + b",") * 50_000, False),  # many, each shallow, over 1 MB
    ],
)
def test_json_depth_from_the_bytes(body: bytes, deep: bool):
    assert json_too_deep(b"[" + body + b"]" if body.endswith(b",") else body, 64) is deep


def test_json_depth_agrees_with_the_parsed_value():
    for depth in (63, 64, 65):
        value: Any = "x"
        for i in range(depth):
            value = [value] if i % 2 else {'k"[': value}
        assert json_too_deep(json.dumps(value).encode(), 64) is (depth > 64)


def test_find_lone_surrogate_names_the_field():
    assert find_lone_surrogate({"messages": [{"content": "ok"}, {"content": [{"text": "x\ud800"}]}]}) == (
        "messages.1.content.0.text"
    )
    assert find_lone_surrogate({"a": {"b\udc80": 1}}) == "a.b\ufffd"
    assert find_lone_surrogate("\ud800") == ""
    assert find_lone_surrogate({"a": ["\U0001f600", 2**70, None, {"b": [[]]}]}) is None
    deep: Any = "\udfff"
    for _ in range(5000):
        deep = [deep]
    assert find_lone_surrogate({"x": deep}) == "x" + ".0" * 5000


@pytest.mark.parametrize(
    "body,param,says",
    [
        (b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}', "messages.0.content", "UTF-8"),
        (b'{"model":"m","messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "messages.0.content", "UTF-8"),
        (b'{"model":"m\xc3"}', "model", "UTF-8"),
        (b'{"model":"m"}\xff', None, "UTF-8"),  # outside any string
        (b'{"model":"m","messages":[{"role":"user","content":"a\\ud800"}]}', "messages.0.content", "surrogate"),
        (b'{"model":"m","user":"\\uDC00\\uD83D"}', "user", "surrogate"),
        (b'{"model":"m","tools":[{"\\ud800":1}]}', "tools.0.\ufffd", "surrogate"),
        (b'"\\ud800"', None, "surrogate"),
        ('{"model":"m"}'.encode("utf-16-le"), None, "UTF-8"),
        (b'{"x":' + b"[" * 65 + b"]" * 65 + b"}", None, "deep"),
    ],
)
def test_json_body_errors_name_the_field(body: bytes, param: str | None, says: str):
    err = json_body_error(body, 64)
    assert isinstance(err, InvalidRequestError) and err.status_code == 400
    assert err.param == param and says in err.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"content":"\\ud83d\\ude00 an escaped pair"}',
        b'{"content":"\\\\ud800 is text after an escaped backslash"}',
        '{"content":"\U0001f600 ünïcödé"}'.encode(),
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        b"not json at all",  # for the parser after this to refuse
    ],
)
def test_json_bodies_that_pass(body: bytes):
    assert json_body_error(body, 64) is None


async def test_the_middleware_answers_json_errors_before_the_app():
    app = Echo()
    status, answer, _ = await call(limited(app), [b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'])
    assert status == 400 and error(answer)["param"] == "messages.0.content" and not app.called
    status, answer, _ = await call(limited(app), [b'{"a":' + b"[" * 65 + b"]" * 65 + b"}"])
    assert status == 400 and "64 deep" in error(answer)["message"] and not app.called


# -- headers ------------------------------------------------------------------------------


async def test_headers_over_the_limit_get_a_431():
    app = Echo()
    big = [(b"content-type", b"application/json"), (b"x-big", b"a" * 40_000)]
    status, answer, read = await call(HeaderLimitMiddleware(app, 32 * 1024), [b"{}"], headers=big)
    assert status == 431 and error(answer)["code"] == "request_header_fields_too_large"
    assert read == 0 and not app.called
    fine = [(b"x-ok", b"a" * 30_000)]
    assert header_bytes(fine) < 32 * 1024
    status, _, _ = await call(HeaderLimitMiddleware(Echo(), 32 * 1024), [b"{}"], headers=fine)
    assert status == 200


# -- schema validators --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [INT64_MIN, -1, 0, INT64_MAX])
def test_seeds_in_the_signed_64_bit_range_are_accepted(seed: int):
    assert req(seed=seed).seed == seed


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 2**70),
        ("max_tokens", 2**70),
        ("max_completion_tokens", 2**31),
        ("top_k", 2**70),
        ("min_tokens", 2**40),
        ("n", 2**70),
    ],
)
def test_integers_out_of_range_are_refused_naming_the_field(field: str, value: int):
    with pytest.raises(ValidationError) as exc:
        req(**{field: value})
    err = _validation_error(RequestValidationError(exc.value.errors()))
    assert err.param == field and err.status_code == 400


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
            "messages.0.content.0.text",
        ),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"f": {"\ud800": 1}}]}]}, None),
        ({"messages": MSG, "stop": ["ok", "\udc00"]}, "stop.1"),
        ({"messages": MSG, "user": "\udc00"}, "user"),
        ({"messages": MSG, "model": "\ud800"}, "model"),
    ],
)
def test_lone_surrogates_anywhere_are_a_400_naming_the_field(body: dict[str, Any], param: str | None):
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate({"model": "m", **body})
    assert exc.value.errors()[0]["type"] == "lone_surrogate"
    err = _validation_error(RequestValidationError(exc.value.errors(), body=None))
    expected = param or "messages.0.tool_calls.0.f.\ufffd"
    assert err.param == expected and err.message.startswith(expected + ": ")
    response = error_response(err)  # renders (a surrogate in a name would have failed it)
    assert response.status_code == 400 and json.loads(bytes(response.body))["error"]["param"] == expected


def test_error_responses_carry_no_surrogates():
    response = error_response(InvalidRequestError("model '\ud800' not found", param="x\udc80"))
    assert json.loads(bytes(response.body))["error"] == {
        "message": "model '\ufffd' not found",
        "type": "invalid_request_error",
        "param": "x\ufffd",
        "code": None,
    }


def test_an_escaped_pair_is_one_character_not_a_lone_surrogate():
    assert (
        req(messages=[{"role": "user", "content": json.loads('"\\ud83d\\ude00"')}]).messages[0].text() == "\U0001f600"
    )


# -- chat limits --------------------------------------------------------------------------


SETTINGS = Settings(max_messages=4, max_prompt_chars=100, max_total_completion_tokens=1000, max_n=16)


def test_too_many_messages():
    with pytest.raises(InvalidRequestError) as exc:
        check_chat_limits(req(messages=MSG * 5), SETTINGS)
    assert exc.value.param == "messages" and exc.value.code == "array_above_max_length"
    check_chat_limits(req(messages=MSG * 4), SETTINGS)


def test_too_much_message_text_counts_parts_names_and_tool_calls():
    with pytest.raises(InvalidRequestError) as exc:
        check_chat_limits(req(messages=[{"role": "user", "content": "x" * 101}]), SETTINGS)
    assert exc.value.param == "messages" and exc.value.code == "string_above_max_length"
    parts = [{"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 41}]
    with pytest.raises(InvalidRequestError):
        check_chat_limits(req(messages=[{"role": "user", "content": parts}]), SETTINGS)
    calls = [{"id": "c", "function": {"name": "f", "arguments": "z" * 100}}]
    with pytest.raises(InvalidRequestError):
        check_chat_limits(req(messages=[{"role": "assistant", "content": "", "tool_calls": calls}]), SETTINGS)
    check_chat_limits(req(messages=[{"role": "user", "content": "x" * 100}]), SETTINGS)


def test_tools_and_template_arguments_count_as_prompt_text():
    """The chat template renders them into the prompt: they count towards
    MAX_PROMPT_CHARS (before: uncounted, whatever their size)."""
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 80}}
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError) as exc:
        check_chat_limits(req(messages=msg, tools=[tool]), SETTINGS)
    assert exc.value.param == "tools" and exc.value.code == "string_above_max_length"
    with pytest.raises(InvalidRequestError):
        check_chat_limits(req(messages=msg, chat_template_kwargs={"system": "s" * 100}), SETTINGS)
    small = {"type": "function", "function": {"name": "f"}}
    check_chat_limits(req(messages=msg, tools=[small], chat_template_kwargs={"enable_thinking": False}), SETTINGS)


def test_n_times_max_tokens():
    with pytest.raises(InvalidRequestError) as exc:
        check_chat_limits(req(n=4, max_tokens=251), SETTINGS)
    assert exc.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as exc:
        check_chat_limits(req(n=2, max_completion_tokens=501), SETTINGS)
    assert exc.value.param == "max_completion_tokens"
    assert check_chat_limits(req(n=4, max_tokens=250), SETTINGS) == 250
    assert check_chat_limits(req(n=3), SETTINGS) == 333  # the cap on a max_tokens left out


class FakeTokenizer:
    vocab_size = 1000

    def __init__(self) -> None:
        self.calls = 0

    def encode_chat(self, req: Any) -> list[int]:
        self.calls += 1
        return [1] * 10


class FakeCatalog:
    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()

    async def get(self, model: str):
        return SimpleNamespace(max_model_len=8192, tool_call_parser=None, reasoning_parser=None), self.tokenizer


async def test_prepare_refuses_before_tokenizing_and_caps_a_default_max_tokens():
    catalog = FakeCatalog()
    adapter = ChatAdapter(SETTINGS, pipeline=None, catalog=catalog)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        await adapter.prepare(req(messages=MSG * 5))
    assert catalog.tokenizer.calls == 0
    record = await adapter.prepare(req(n=4))
    assert record.request is not None and record.request.sampling.max_tokens == 250  # not 8182
    record = await adapter.prepare(req(max_tokens=100))
    assert record.request is not None and record.request.sampling.max_tokens == 100


# -- the whole app ------------------------------------------------------------------------


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    install_limits(app, Settings(max_request_bytes=LIMIT, max_header_bytes=8 * 1024))

    @app.post("/v1/chat/completions")
    async def create(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        return {"ok": True, "seed": body.seed}

    return TestClient(app)


def test_the_app_answers_every_limit_with_an_error_object(client: TestClient):
    ok = {"model": "m", "messages": MSG}
    assert client.post("/v1/chat/completions", json=ok).json() == {"ok": True, "seed": None}
    cases = [
        ({"content": json.dumps({**ok, "pad": "x" * LIMIT})}, 413, None),
        ({"content": b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'}, 400, "messages.0.content"),
        ({"content": b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}'}, 400, "messages.0.content"),
        ({"content": json.dumps({**ok, "seed": 2**70})}, 400, "seed"),
        ({"content": json.dumps({**ok, "x": json.loads("[" * 65 + "]" * 65)})}, 400, None),
        ({"json": ok, "headers": {"x-big": "a" * 9000}}, 431, None),
    ]
    for kwargs, status, param in cases:
        kwargs.setdefault("headers", {"content-type": "application/json"})
        response = client.post("/v1/chat/completions", **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, response.text
        assert error(response.json())["param"] == param
