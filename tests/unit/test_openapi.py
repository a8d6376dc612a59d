"""The OpenAPI document (api/openapi.py) says what the API answers: no 422s (validation
errors are 400s), the bearer key on every operation but the health checks, every error as
an OpenAI error object, request schemas that accept what the validators accept. Built
from the app alone: no Redis. `tests/integration/test_fuzz.py` fuzzes the real stack."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.limits import check_chat_limits
from api.main import create_app
from common.errors import InvalidRequestError
from common.responses import ResponsesRequest, chat_body, meta_of
from common.schemas import ChatCompletionRequest, CompletionRequest
from common.settings import Settings

PUBLIC = {"/health", "/v1/health"}
METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture(scope="module")
def app() -> Any:
    return create_app(Settings(api_keys="sk-unit-test-key", max_n=8))


@pytest.fixture(scope="module")
def doc(app: Any) -> dict[str, Any]:
    return app.openapi()  # type: ignore[no-any-return]


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, m, op) for path, item in doc["paths"].items() for m, op in item.items() if m in METHODS]


def test_the_document_is_valid_openapi_and_served_as_built(app: Any, doc: dict[str, Any]) -> None:
    loaded = schemathesis.openapi.from_dict(json.loads(json.dumps(doc)))
    results = list(loaded.get_all_operations())
    assert all(r.ok() for r in results) and len(results) == len(operations(doc)) >= 17
    served = TestClient(app).get("/openapi.json", headers={"Authorization": "Bearer sk-unit-test-key"})
    assert served.status_code == 200 and served.json() == json.loads(json.dumps(doc))


def test_no_422_anywhere(doc: dict[str, Any]) -> None:
    for path, method, op in operations(doc):
        assert "422" not in op["responses"], (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "HTTPValidationError" not in json.dumps(doc)


def test_every_operation_but_health_needs_the_bearer_key(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for path, method, op in operations(doc):
        if path in PUBLIC:
            assert op["security"] == [] and "401" not in op["responses"], path
            continue
        assert op["security"] == [{"bearerAuth": []}], (method, path)
        unauthorized = op["responses"]["401"]
        assert "WWW-Authenticate" in unauthorized["headers"]
        assert unauthorized["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_every_error_is_an_openai_error_object(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    for path, method, op in operations(doc):
        errors = {code: r for code, r in op["responses"].items() if int(code) >= 400}
        assert "503" in errors, (method, path)  # everything reads Redis
        for code, response in errors.items():
            if path in PUBLIC and code == "503":
                continue  # the health checks answer 503 with their own body
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)


def test_each_route_documents_what_it_answers(doc: dict[str, Any]) -> None:
    def codes(method: str, path: str) -> set[str]:
        return set(doc["paths"][path][method]["responses"])

    assert codes("post", "/v1/chat/completions") == {"200", "400", "401", "404", "413", "429", "431", "500", "503"}
    assert codes("post", "/v1/chat/completions/{completion_id}/cancel") == {"200", "401", "404", "409", "431", "503"}
    assert codes("get", "/v1/chat/completions/{completion_id}/stream") == {"200", "400", "401", "404", "431", "503"}
    assert codes("post", "/v1/files") == {"200", "400", "401", "413", "431", "503"}
    assert codes("post", "/v1/batches") == {"200", "400", "401", "404", "413", "431", "503"}
    assert codes("post", "/v1/batches/{batch_id}/cancel") == {"200", "401", "404", "409", "431", "503"}
    assert codes("get", "/health") == {"200", "431", "503"}
    assert codes("post", "/v1/responses") == {"200", "400", "401", "404", "413", "429", "431", "500", "503"}
    assert codes("get", "/v1/responses/{response_id}") == {"200", "400", "401", "404", "431", "503"}
    assert codes("get", "/v1/responses/{response_id}/input_items") == {"200", "400", "401", "404", "431", "503"}
    assert codes("post", "/v1/responses/{response_id}/cancel") == {"200", "401", "404", "431", "503"}
    assert codes("delete", "/v1/responses/{response_id}") == {"200", "401", "404", "431", "503"}
    limited = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["429"]
    assert limited["headers"]["Retry-After"]["required"] is True


def test_streams_are_documented_as_sse_events(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(create) == {"application/json", "text/event-stream"}
    stream = doc["paths"]["/v1/chat/completions/{completion_id}/stream"]["get"]["responses"]["200"]["content"]
    assert set(stream) == {"text/event-stream"}
    event = stream["text/event-stream"]["schema"]
    assert event["required"] == ["data"] and "ChatCompletionChunk" in json.dumps(event)
    assert "ChatCompletionChunk" in doc["components"]["schemas"]
    content = doc["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/octet-stream"}
    for path, method in (("/v1/responses", "post"), ("/v1/responses/{response_id}", "get")):
        content = doc["paths"][path][method]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        event = content["text/event-stream"]["schema"]
        assert event["type"] == "object" and event["required"] == ["event", "data"], path


def test_parameters_are_never_null_and_integer_bounds_are_exact(doc: dict[str, Any]) -> None:
    for path, method, op in operations(doc):
        for param in op.get("parameters", []):
            assert {"type": "null"} not in param["schema"].get("anyOf", []), (method, path, param["name"])
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    seed = props["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert props["n"]["anyOf"][0]["maximum"] == 8  # MAX_N, from the settings
    completion = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["n"]["anyOf"][0]["maximum"] == 8


def test_405_names_every_method_of_the_path(app: Any) -> None:
    client = TestClient(app)
    auth = {"Authorization": "Bearer sk-unit-test-key"}
    for method, path, allowed in [
        ("PUT", "/v1/files", "GET, POST"),
        ("POST", "/v1/files/file-x", "DELETE, GET"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("TRACE", "/v1/models", "GET"),
    ]:
        resp = client.request(method, path, headers=auth)
        assert resp.status_code == 405, (method, path)
        assert set(resp.headers["allow"].split(", ")) - {"HEAD"} == set(allowed.split(", ")), (method, path)
        assert resp.json()["error"]["type"] == "invalid_request_error"


def _message(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi", **fields}]}


# Bodies on both sides of each documented constraint.
BODIES = [
    pytest.param(_message(), id="plain"),
    pytest.param({"model": "m", "messages": [{"role": "tool"}]}, id="no-content"),
    pytest.param({"model": "m", "messages": [{"role": "tool", "content": None}]}, id="null-content"),
    pytest.param({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "t"}]}]}, id="tool-calls"),
    pytest.param({"model": "m", "messages": [{"role": "assistant", "tool_calls": []}]}, id="no-tool-calls"),
    pytest.param(_message(content=[{"type": "text", "text": "a"}]), id="text-part"),
    pytest.param(_message(content=[{"type": "image_url", "image_url": {"url": "x"}}]), id="image-part"),
    pytest.param(_message(content=[{"type": "text"}]), id="part-without-text"),
    pytest.param({**_message(), "stream_options": {"include_usage": True}}, id="stream-options-alone"),
    pytest.param({**_message(), "stream": True, "stream_options": {"include_usage": True}}, id="stream-options"),
    pytest.param({**_message(), "stream_options": None}, id="null-stream-options"),
    pytest.param({**_message(), "logprobs": True}, id="logprobs"),
    pytest.param({**_message(), "logprobs": False, "top_logprobs": 0}, id="no-logprobs"),
    pytest.param({**_message(), "top_logprobs": 2}, id="top-logprobs"),
    pytest.param({**_message(), "response_format": {"type": "json_object"}}, id="json-format"),
    pytest.param({**_message(), "response_format": {"type": "text"}}, id="text-format"),
    pytest.param({**_message(), "tools": [{"type": "function"}], "tool_choice": "auto"}, id="tool-calling"),
    pytest.param({**_message(), "tools": [{"type": "function"}], "tool_choice": "none"}, id="tools-unused"),
    pytest.param({**_message(), "tools": [], "tool_choice": "auto"}, id="no-tools"),
    pytest.param({**_message(), "stop": ""}, id="empty-stop"),
    pytest.param({**_message(), "stop": "x"}, id="stop"),
    pytest.param({**_message(), "stop": ["x"] * 5}, id="5-stops"),
    pytest.param({**_message(), "stop": ["x"] * 4, "logprobs": True}, id="4-stops-rich"),
    pytest.param({**_message(), "stop": ["x", ""]}, id="an-empty-stop"),
    pytest.param({**_message(), "seed": 2**63}, id="seed-2**63"),
    pytest.param({**_message(), "seed": 2**63 - 1}, id="seed-2**63-1"),
    pytest.param({**_message(), "max_tokens": 0}, id="max-tokens-0"),
    pytest.param({**_message(), "unknown_field": {"is": "ignored"}}, id="unknown-field"),
    # Issue 10: OpenAI's nulls, and the whole chat surface.
    pytest.param({**_message(), "n": None, "stream": None, "temperature": None, "seed": None}, id="nulls"),
    pytest.param({**_message(), "logprobs": None, "top_logprobs": None, "tools": None}, id="more-nulls"),
    pytest.param({**_message(), "logprobs": True, "top_logprobs": 20}, id="top-logprobs-20"),
    pytest.param({**_message(), "logprobs": True, "top_logprobs": 21}, id="top-logprobs-21"),
    pytest.param({**_message(), "logit_bias": {"50": 10, "7": -100}}, id="logit-bias"),
    pytest.param({**_message(), "logit_bias": {"x": 1}}, id="logit-bias-key"),
    pytest.param({**_message(), "logit_bias": {"5": 101}}, id="logit-bias-value"),
    pytest.param({**_message(), "functions": [{"name": "f"}]}, id="functions"),
    pytest.param({**_message(), "function_call": "auto"}, id="function-call"),
    pytest.param({**_message(), "functions": None}, id="null-functions"),
    pytest.param({**_message(), "audio": {"voice": "x"}}, id="audio"),
    pytest.param({**_message(), "modalities": ["text"]}, id="modalities-text"),
    pytest.param({**_message(), "modalities": ["text", "audio"]}, id="modalities-audio"),
    pytest.param({**_message(), "prediction": {"type": "content"}}, id="prediction"),
    pytest.param({**_message(), "web_search_options": {}}, id="web-search"),
    pytest.param({**_message(), "use_beam_search": False}, id="beam-search-off"),
    pytest.param({**_message(), "use_beam_search": True}, id="beam-search"),
    pytest.param({**_message(), "echo": 0}, id="echo-0"),
    pytest.param({**_message(), "user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "auto"}, id="ok"),
    pytest.param({**_message(), "tools": [{"type": "function", "function": {"name": "f"}}]}, id="tools-auto"),
    pytest.param(
        {**_message(), "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
        id="tools-required",
    ),
    pytest.param(
        {
            **_message(),
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        id="tools-named",
    ),
    pytest.param({**_message(), "tool_choice": "required"}, id="tool-choice-without-tools"),
    pytest.param({**_message(), "tool_choice": None}, id="null-tool-choice"),
    pytest.param({**_message(), "tool_choice": "sometimes"}, id="bad-tool-choice"),
    pytest.param({**_message(), "tools": [{"type": "function", "function": {"name": ""}}]}, id="tool-no-name"),
    pytest.param({**_message(), "parallel_tool_calls": False}, id="parallel-tool-calls"),
    pytest.param(
        {**_message(), "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        id="json-schema",
    ),
    pytest.param({**_message(), "response_format": {"type": "json_schema"}}, id="json-schema-missing"),
    pytest.param({**_message(), "response_format": {"type": "xml"}}, id="xml-format"),
    pytest.param({**_message(), "structured_outputs": {"regex": "[a-z]+"}}, id="so-regex"),
    pytest.param({**_message(), "structured_outputs": {"choice": ["a", "b"]}}, id="so-choice"),
    pytest.param({**_message(), "structured_outputs": {"json": {"type": "object"}}}, id="so-json"),
    pytest.param({**_message(), "structured_outputs": {"regex": "a", "choice": ["a"]}}, id="so-two"),
    pytest.param({**_message(), "structured_outputs": {"regex": "a", "grammar": None}}, id="so-null-other"),
    pytest.param({**_message(), "structured_outputs": {}}, id="so-none"),
    pytest.param({**_message(), "structured_outputs": {"regex": "a", "x": 1}}, id="so-unknown"),
    pytest.param({**_message(), "chat_template_kwargs": {"enable_thinking": False}}, id="template-kwargs"),
    pytest.param({**_message(), "include_reasoning": False, "reasoning_effort": "low"}, id="reasoning"),
    pytest.param({**_message(), "reasoning_effort": "huge"}, id="bad-reasoning-effort"),
    pytest.param({**_message(), "stream_options": {"include_usage": None}, "stream": True}, id="null-include-usage"),
    pytest.param(
        {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]}]},
        id="tool-call-id-not-string",
    ),
    pytest.param(
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                {"role": "tool", "content": "1", "tool_call_id": "c"},
            ],
        },
        id="tool-history",
    ),
]


COMPLETION_BODIES = [
    pytest.param({"model": "m", "prompt": "hi"}, id="string"),
    pytest.param({"model": "m", "prompt": ["a", "b"]}, id="strings"),
    pytest.param({"model": "m", "prompt": [1, 2, 3]}, id="ids"),
    pytest.param({"model": "m", "prompt": [[1, 2], [3]]}, id="id-lists"),
    pytest.param({"model": "m", "prompt": ""}, id="empty"),
    pytest.param({"model": "m", "prompt": []}, id="empty-list"),
    pytest.param({"model": "m", "prompt": [[]]}, id="empty-ids"),
    pytest.param({"model": "m", "prompt": ["a", ""]}, id="an-empty-string"),
    pytest.param({"model": "m", "prompt": [-1]}, id="negative-id"),
    pytest.param({"model": "m"}, id="no-prompt"),
    pytest.param({"model": "m", "prompt": None}, id="null-prompt"),
    pytest.param({"model": "m", "prompt": "x", "max_tokens": None, "n": None, "echo": None}, id="nulls"),
    pytest.param({"model": "m", "prompt": "x", "echo": True, "logprobs": 3}, id="echo-logprobs"),
    pytest.param({"model": "m", "prompt": "x", "logprobs": 21}, id="logprobs-21"),
    pytest.param({"model": "m", "prompt": "x", "suffix": "y"}, id="suffix"),
    pytest.param({"model": "m", "prompt": "x", "suffix": None}, id="null-suffix"),
    pytest.param({"model": "m", "prompt": "x", "best_of": 2, "n": 2}, id="best-of-n"),
    pytest.param({"model": "m", "prompt": "x", "best_of": 2}, id="best-of"),
    pytest.param({"model": "m", "prompt": "x", "max_tokens": 0}, id="max-tokens-0"),
    pytest.param({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, id="stream-options"),
    pytest.param({"model": "m", "prompt": "x", "logit_bias": {"1": 5}}, id="logit-bias"),
    pytest.param({"model": "m", "prompt": "x", "n": 2, "temperature": 0}, id="greedy-n-2"),
    pytest.param({"model": "m", "prompt": "x", "n": 2, "temperature": 0.5}, id="sampled-n-2"),
    pytest.param({"model": "m", "prompt": "x", "n": 2}, id="default-temperature-n-2"),
]


@pytest.mark.parametrize("body", COMPLETION_BODIES)
def test_the_completion_schema_accepts_what_the_validators_accept(doc: dict[str, Any], body: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/CompletionRequest", "components": doc["components"]}
    )
    documented = validator.is_valid(body)
    try:
        CompletionRequest.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert documented == accepted, f"documented {documented}, validators {accepted}"


@pytest.mark.parametrize("body", BODIES)
def test_the_request_schema_accepts_what_the_validators_accept(doc: dict[str, Any], body: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/ChatCompletionRequest", "components": doc["components"]}
    )
    documented = validator.is_valid(body)
    try:
        ChatCompletionRequest.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert documented == accepted, f"documented {documented}, validators {accepted}"


def _input(*items: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": list(items), **fields}


_USER = {"role": "user", "content": "hi"}
_TOOL = {"type": "function", "name": "f"}

# Bodies on both sides of each documented constraint of `POST /v1/responses`.
RESPONSES_BODIES = [
    pytest.param({"model": "m", "input": "hi"}, id="string"),
    pytest.param({"model": "m", "input": ""}, id="empty-string"),
    pytest.param({"model": "m", "input": []}, id="no-items"),
    pytest.param({"model": "m"}, id="no-input"),
    pytest.param({"model": "", "input": "hi"}, id="empty-model"),
    pytest.param(_input(_USER), id="message-without-type"),
    pytest.param(_input({"type": "message", **_USER}), id="message"),
    pytest.param(_input({"type": None, **_USER}), id="null-type"),
    pytest.param(_input({"content": "hi"}), id="no-role"),
    pytest.param(_input({"role": "tool", "content": "hi"}), id="tool-role"),
    pytest.param(_input({"role": "developer", "content": "hi"}), id="developer-role"),
    pytest.param(_input({"role": "user"}), id="no-content"),
    pytest.param(_input({"role": "user", "content": None}), id="null-content"),
    pytest.param(_input({"role": "user", "content": 1}), id="number-content"),
    pytest.param(_input({"role": "user", "content": []}), id="no-parts"),
    pytest.param(_input({"role": "user", "content": [{"type": "input_text", "text": "a"}]}), id="input-text"),
    pytest.param(_input({"role": "assistant", "content": [{"type": "output_text", "text": "a"}]}), id="output-text"),
    pytest.param(_input({"role": "user", "content": [{"type": "input_text"}]}), id="part-without-text"),
    pytest.param(_input({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}), id="image"),
    pytest.param(_input({"role": "user", "content": ["a"]}), id="string-part"),
    pytest.param(_input({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}), id="refusal"),
    pytest.param(_input({"role": "assistant", "content": [{"type": "refusal", "text": "no"}]}), id="bad-refusal"),
    pytest.param(_input({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}), id="function-call"),
    pytest.param(_input({"type": "function_call", "call_id": "c", "name": "f"}), id="call-without-arguments"),
    pytest.param(
        _input({"type": "function_call", "call_id": 1, "name": "f", "arguments": "{}"}), id="call-id-not-string"
    ),
    pytest.param(_input({"type": "function_call_output", "call_id": "c", "output": "1"}), id="call-output"),
    pytest.param(
        _input({"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "1"}]}),
        id="call-output-parts",
    ),
    pytest.param(_input({"type": "function_call_output", "call_id": "c", "output": 1}), id="call-output-number"),
    pytest.param(_input({"type": "function_call_output", "call_id": "c"}), id="call-output-missing"),
    pytest.param(_input({"type": "reasoning", "summary": []}, _USER), id="reasoning"),
    pytest.param(
        _input({"type": "reasoning", "content": [{"type": "reasoning_text", "text": "t"}]}), id="only-reasoning"
    ),
    pytest.param(_input({"type": "reasoning"}, instructions="be brief"), id="only-reasoning-instructions"),
    pytest.param(_input({"type": "reasoning"}, instructions=""), id="only-reasoning-empty-instructions"),
    pytest.param(_input({"type": "item_reference", "id": "x"}), id="item-reference"),
    pytest.param(_input(_USER, "hi"), id="string-item"),
    pytest.param({"model": "m", "input": "hi", "tools": [_TOOL]}, id="tool"),
    pytest.param({"model": "m", "input": "hi", "tools": []}, id="no-tools"),
    pytest.param({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, id="built-in-tool"),
    pytest.param({"model": "m", "input": "hi", "tools": [{"type": "function", "name": ""}]}, id="tool-empty-name"),
    pytest.param({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, id="tool-no-name"),
    pytest.param({"model": "m", "input": "hi", "tools": [{**_TOOL, "name": "f" * 257}]}, id="tool-long-name"),
    pytest.param({"model": "m", "input": "hi", "tools": [{**_TOOL, "parameters": None}]}, id="tool-null-parameters"),
    pytest.param({"model": "m", "input": "hi", "tools": [{**_TOOL, "parameters": []}]}, id="tool-list-parameters"),
    pytest.param({"model": "m", "input": "hi", "tools": [{**_TOOL, "description": 1}]}, id="tool-description-number"),
    pytest.param({"model": "m", "input": "hi", "tools": [{**_TOOL, "strict": "maybe"}]}, id="tool-strict-string"),
    pytest.param({"model": "m", "input": "hi", "tools": [_TOOL], "tool_choice": "required"}, id="required"),
    pytest.param({"model": "m", "input": "hi", "tool_choice": "required"}, id="required-without-tools"),
    pytest.param({"model": "m", "input": "hi", "tool_choice": "auto"}, id="auto-without-tools"),
    pytest.param({"model": "m", "input": "hi", "tool_choice": "sometimes"}, id="bad-tool-choice"),
    pytest.param(
        {"model": "m", "input": "hi", "tools": [_TOOL], "tool_choice": {"type": "function", "name": "f"}}, id="named"
    ),
    pytest.param({"model": "m", "input": "hi", "tool_choice": {"type": "function", "name": "f"}}, id="named-no-tools"),
    pytest.param(
        {"model": "m", "input": "hi", "tools": [_TOOL], "tool_choice": {"type": "function", "name": "g"}},
        id="named-not-a-tool",
    ),
    pytest.param(
        {"model": "m", "input": "hi", "tools": [_TOOL], "tool_choice": {"type": "file_search"}}, id="named-built-in"
    ),
    pytest.param({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}}, id="json-object"),
    pytest.param({"model": "m", "input": "hi", "text": {"format": None, "verbosity": "low"}}, id="null-format"),
    pytest.param({"model": "m", "input": "hi", "text": {"format": {"type": "xml"}}}, id="xml-format"),
    pytest.param(
        {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}},
        id="json-schema",
    ),
    pytest.param(
        {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, id="no-schema"
    ),
    pytest.param(
        {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "", "schema": {}}}},
        id="schema-empty-name",
    ),
    pytest.param(
        {
            "model": "m",
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "description": 1}},
        },
        id="schema-description-number",
    ),
    pytest.param({"model": "m", "input": "hi", "reasoning": {"effort": "low", "summary": "auto"}}, id="effort"),
    pytest.param({"model": "m", "input": "hi", "reasoning": {"effort": "max"}}, id="effort-max"),
    pytest.param({"model": "m", "input": "hi", "metadata": {"k": "v"}}, id="metadata"),
    pytest.param({"model": "m", "input": "hi", "metadata": {"k": 1}}, id="metadata-number"),
    pytest.param({"model": "m", "input": "hi", "metadata": {str(i): "v" for i in range(17)}}, id="metadata-17"),
    pytest.param({"model": "m", "input": "hi", "metadata": {"k" * 65: "v"}}, id="metadata-long-key"),
    pytest.param({"model": "m", "input": "hi", "metadata": {"k": "v" * 513}}, id="metadata-long-value"),
    pytest.param({"model": "m", "input": "hi", "stop": ""}, id="empty-stop"),
    pytest.param({"model": "m", "input": "hi", "stop": ["x"] * 5}, id="5-stops"),
    pytest.param({"model": "m", "input": "hi", "stop": ["x"] * 4}, id="4-stops"),
    pytest.param({"model": "m", "input": "hi", "background": True}, id="background"),
    pytest.param({"model": "m", "input": "hi", "background": True, "store": False}, id="background-unstored"),
    pytest.param({"model": "m", "input": "hi", "background": True, "store": None}, id="background-null-store"),
    pytest.param({"model": "m", "input": "hi", "include": []}, id="include-none"),
    pytest.param({"model": "m", "input": "hi", "include": ["reasoning.encrypted_content"]}, id="include"),
    pytest.param({"model": "m", "input": "hi", "truncation": "auto"}, id="truncation"),
    pytest.param({"model": "m", "input": "hi", "conversation": "conv_1"}, id="conversation"),
    pytest.param({"model": "m", "input": "hi", "max_output_tokens": 0}, id="max-output-tokens-0"),
    pytest.param({"model": "m", "input": "hi", "max_output_tokens": 300_000}, id="max-output-tokens-300000"),
    pytest.param(
        {
            "model": "m",
            "input": "hi",
            "instructions": None,
            "tools": None,
            "tool_choice": None,
            "text": None,
            "store": None,
            "stream": None,
            "min_tokens": None,
            "temperature": None,
        },
        id="nulls",
    ),
    pytest.param({"model": "m", "input": "hi", "service_tier": "auto", "user": "u"}, id="unknown-field"),
]


def _responses_accept(body: dict[str, Any]) -> bool:
    """What `POST /v1/responses` takes before the model is looked up: its own validators
    and those of the chat request that answers it (no `previous_response_id` here)."""
    settings = Settings(api_keys="sk-unit-test-key", max_n=8)
    try:
        req = ResponsesRequest.model_validate(body)
        chat = ChatCompletionRequest.model_validate(chat_body(req, meta_of(req, "x", [])))
        check_chat_limits(chat, settings)
    except (ValidationError, InvalidRequestError):
        return False
    return True


@pytest.mark.parametrize("body", RESPONSES_BODIES)
def test_the_responses_schema_accepts_what_the_validators_accept(doc: dict[str, Any], body: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/ResponsesRequest", "components": doc["components"]}
    )
    documented = validator.is_valid(body)
    accepted = _responses_accept(body)
    if body.get("tool_choice") == {"type": "function", "name": "g"}:
        # That a named function is one of `tools` relates two values: no static schema says it
        # (as on chat; tests/integration/test_fuzz.py steers valid cases to `auto`).
        assert (documented, accepted) == (True, False)
        return
    assert documented == accepted, f"documented {documented}, validators {accepted}"


def test_no_route_or_dependency_runs_in_the_thread_pool(app: Any) -> None:
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread
    hand-off per request each (the create route's two `def` dependencies cost about 7% of
    the API's CPU under load, issue 12). Every one is `async def`."""
    import inspect

    from fastapi.routing import APIRoute

    sync: list[str] = []

    def walk(dependant: Any, where: str) -> None:
        for dep in dependant.dependencies:
            if dep.call is not None and not inspect.iscoroutinefunction(dep.call):
                sync.append(f"{where}: {getattr(dep.call, '__qualname__', dep.call)}")
            walk(dep, where)

    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) > 20
    for route in routes:
        where = f"{sorted(route.methods)} {route.path}"
        if not inspect.iscoroutinefunction(route.endpoint):
            sync.append(f"{where}: the endpoint")
        walk(route.dependant, where)
    assert not sync, sync
