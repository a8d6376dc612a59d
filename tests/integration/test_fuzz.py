"""Property-based fuzzing of the whole OpenAPI document (schemathesis) against the running
stack: every operation of `/openapi.json`, each request generated from the document
(its examples, the coverage phase's boundary and invalid values, undeclared methods, then
random fuzzing), and every response checked against it: no 5xx, a documented status,
content type, headers and body (SSE events included), schema-valid requests accepted,
405s with `Allow`, 401 without a key.

To reach generation, a valid chat (or Responses) request names the real model most of
the time, and asks for a few tokens of at most two choices (the engine is a 135M model on
CPU). Path ids are generated (unknown: 404) or, for a share of the cases, ids that exist
(a job, a file, a batch, a response made here, the model). Seeded (derandomized): the same
cases every run."""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS as CHECKS_REGISTRY
from schemathesis.checks import load_all_checks

from api.auth import PUBLIC_METHODS, PUBLIC_PATHS

pytestmark = pytest.mark.integration

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    "negative_data_rejection",
]
# Random cases per operation after the explicit ones (examples and the coverage phase).
MAX_EXAMPLES = 80
# What a generated chat request may ask of the engine.
MAX_TOKENS = 4
MAX_CHOICES = 2

schema = schemathesis.pytest.from_fixture("fuzz_schema")
load_all_checks()
CHECKS_BY_NAME = CHECKS_REGISTRY.get_by_names
# Per operation: response statuses seen; chat requests that reached generation.
SEEN: dict[str, Counter[int]] = defaultdict(Counter)
GENERATED: Counter[str] = Counter()


def _plain(value: object) -> str:
    # Bytes by content; anything else (such as "no body") by its type: never by address.
    return value.hex() if isinstance(value, bytes) else type(value).__name__


def _share(case: schemathesis.Case, salt: str, out_of: int) -> bool:
    """A stable one-in-`out_of` choice per case (the same every run, unlike `hash`)."""
    key = json.dumps([salt, case.method, case.path_parameters, case.query, case.body], sort_keys=True, default=_plain)
    return zlib.crc32(key.encode()) % out_of == 0


@pytest.fixture(scope="module")
def resources(stack: Any, http: httpx.Client, model: str) -> dict[str, Any]:
    """Ids that exist, owned by the `http` fixture's key: a finished job, files, a batch."""
    job = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_TOKENS},
    ).json()
    line = {
        "custom_id": "fuzz-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_TOKENS},
    }
    data = json.dumps(line).encode() + b"\n"
    files = [
        http.post("/v1/files", files={"file": ("fuzz.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
        for _ in range(2)
    ]
    batch = http.post(
        "/v1/batches",
        json={"input_file_id": files[0], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ).json()
    responses = [
        http.post("/v1/responses", json={"model": model, "input": "Hi", "max_output_tokens": MAX_TOKENS}).json()["id"]
        for _ in range(2)
    ]
    items = http.get(f"/v1/responses/{responses[0]}/input_items").json()["data"]
    # files[1] and responses[1] are the ones a generated DELETE may remove.
    return {
        "completion_id": job["id"],
        "file_id": files[0],
        "deletable_file_id": files[1],
        "batch_id": batch["id"],
        "model_id": model,
        "response_id": responses[0],
        "deletable_response_id": responses[1],
        "input_item_id": items[0]["id"],
    }


@pytest.fixture(scope="module")
def fuzz_schema(stack: Any, api_key: str) -> schemathesis.BaseSchema:
    # The key goes in through the document's own security scheme, so schemathesis knows it
    # is the real one: `ignored_auth` then probes each operation without it and with a wrong one.
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"bearerAuth": {"bearer": api_key}}}})
    loaded = schemathesis.openapi.from_url(
        f"{stack.api_url}/openapi.json", config=config, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    loaded.config.update(request_timeout=120)
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, with_security_parameters=False)
    loaded.config.checks.update(included_check_names=CHECKS)
    loaded.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    return loaded


def _steer(case: schemathesis.Case, model: str, resources: dict[str, Any]) -> None:
    """Point a share of the cases at things that exist, and keep generation short."""
    positive = case.meta is None or case.meta.generation.mode.is_positive
    for name in list(case.path_parameters or {}):
        real = resources.get(f"deletable_{name}" if case.method == "DELETE" else name, resources.get(name))
        if real is not None and _share(case, name, 3):
            case.path_parameters[name] = real
    if positive and case.path == "/v1/responses/{response_id}/input_items" and case.query:
        # The `after` / `before` cursors must name an input item of the response (a 400
        # otherwise): a relation to stored data, which no static schema says. A third name
        # the real response's item, the others go.
        for key in ("after", "before"):
            if key in case.query:
                if _share(case, key, 3):
                    case.query[key] = resources["input_item_id"]
                else:
                    del case.query[key]
    body = case.body
    if not positive or not isinstance(body, dict):
        return  # an invalid request is left as generated: it must be refused as it is
    if case.path in ("/v1/chat/completions", "/v1/completions") and case.method == "POST":
        if not _share(case, "model", 5):  # four in five name the real model
            body["model"] = model
        wanted = [body.get(k) for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int)]
        cap = min([MAX_TOKENS, *wanted])
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body and body[key] is not None:
                body[key] = cap
        if not any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens")):
            body["max_tokens"] = cap
        body["n"] = min(body.get("n") or 1, MAX_CHOICES)
        if body.get("best_of") is not None:
            body["best_of"] = body["n"]
        body["min_tokens"] = min(body.get("min_tokens") or 0, cap)
        # What is valid only for a model (its vocabulary, its grammar backend) is left out
        # of valid requests, as the context length is above: token ids in range, no
        # generated grammars or schemas (tests/integration/test_openai_surface.py has them).
        for key in ("logit_bias", "stop_token_ids", "structured_outputs"):
            body.pop(key, None)
        if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_schema":
            body["response_format"] = {"type": "json_object"}
        if isinstance(body.get("tool_choice"), dict) or body.get("tool_choice") == "required":
            body["tool_choice"] = "auto"  # forced calls compile the tool's (generated) schema
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[:MAX_CHOICES]
            # (A token id may come as a whole float: 3.0 is an integer to JSON Schema.)
            body["prompt"] = [
                [int(t) % 1000 for t in p[:8]] if isinstance(p, list) else p if isinstance(p, str) else int(p) % 1000
                for p in prompt
            ]
    elif case.path == "/v1/responses" and case.method == "POST":
        _steer_response(case, body, model, resources)
    elif case.path == "/v1/batches" and case.method == "POST" and _share(case, "input_file_id", 4):
        body["input_file_id"] = resources["file_id"]


def _steer_response(case: schemathesis.Case, body: dict[str, Any], model: str, resources: dict[str, Any]) -> None:
    """A valid `POST /v1/responses` is steered as a valid chat request is: the real model
    four times in five, a few tokens, nothing only a model can validate."""
    if not _share(case, "model", 5):
        body["model"] = model
    if body.get("stream") is None and _share(case, "stream", 4):
        body["stream"] = True  # generated bodies seldom set it: a share of them streams
    wanted = body.get("max_output_tokens")
    cap = min(MAX_TOKENS, wanted) if isinstance(wanted, int) else MAX_TOKENS
    body["max_output_tokens"] = cap
    body["min_tokens"] = min(body.get("min_tokens") or 0, cap)
    for key in ("logit_bias", "stop_token_ids", "structured_outputs"):
        body.pop(key, None)  # not Responses fields (ignored), but never any model's vocabulary
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict) and text["format"].get("type") == "json_schema":
        text["format"] = {"type": "json_object"}  # a generated schema may not compile for the engine
    if isinstance(body.get("tool_choice"), dict) or body.get("tool_choice") == "required":
        # Forced calls compile the tool's (generated) schema; and that a named function is
        # one of `tools` (a relation between two values) is more than a static schema says.
        body["tool_choice"] = "auto"
    # A generated previous_response_id names nothing (a 404): point a third of them at a
    # stored response, or at least those whose only chat messages would be its conversation
    # (reasoning items alone, no instructions); drop the others. A long input is not given
    # one (its conversation adds to the messages counted against MAX_MESSAGES).
    if body.get("previous_response_id") is not None:
        items = body["input"] if isinstance(body.get("input"), list) else []
        alone = bool(items) and all(i.get("type") == "reasoning" for i in items) and not body.get("instructions")
        if (alone or _share(case, "previous_response_id", 3)) and len(items) < 1000:
            body["previous_response_id"] = resources["response_id"]
        elif alone:
            body["instructions"] = "Hi"
            del body["previous_response_id"]
        else:
            del body["previous_response_id"]


@pytest.fixture(autouse=True)
def _node_id_shim(request: pytest.FixtureRequest) -> None:
    # schemathesis' lazy schema renames the test per operation through `node._nodeid`,
    # an attribute pytest 9.2 no longer has; give it one (pytest reports from `nodeid`).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
def test_fuzz_openapi(case: schemathesis.Case, model: str, resources: dict[str, Any]) -> None:
    _steer(case, model, resources)
    if case.path in PUBLIC_PATHS and case.method not in PUBLIC_METHODS:
        # Only GET/HEAD of the health checks are public (api.auth): any other method needs a
        # key first, so an undeclared one is a 401 there, before routing could say 405.
        response = case.call_and_validate(excluded_checks=CHECKS_BY_NAME(["unsupported_method"]))
        assert response.status_code == 401
    elif (case.method, case.path) == ("POST", "/v1/files"):
        # A multipart part is bytes on the wire: a file part generated as a "number" is a
        # file holding digits, which the API rightly stores; that mutation cannot be refused.
        response = case.call_and_validate(excluded_checks=CHECKS_BY_NAME(["negative_data_rejection"]))
    else:
        response = case.call_and_validate()
    declared = case.method == case.operation.method.upper()
    SEEN[case.operation.label if declared else "undeclared methods"][response.status_code] += 1
    generating = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses")
    if declared and case.operation.label in generating and response.status_code == 200:
        streamed = "event-stream" in response.headers.get("content-type", [""])[0]
        GENERATED[f"{case.operation.label} ({'streamed' if streamed else 'json'})"] += 1


def test_fuzz_covered_everything(fuzz_schema: schemathesis.BaseSchema, http: httpx.Client) -> None:
    """What the fuzzing reached: every operation, and chat requests that ran on the engine."""
    operations = {op.ok().label for op in fuzz_schema.get_all_operations()}
    print(f"\nfuzzed {sum(sum(c.values()) for c in SEEN.values())} cases; statuses per operation:")
    for label in sorted(SEEN):
        print(f"  {label}: {dict(sorted(SEEN[label].items()))}")
    print(f"  generated on the engine: {dict(sorted(GENERATED.items()))}")
    assert operations <= set(SEEN), f"never fuzzed: {sorted(operations - set(SEEN))}"
    assert sum(GENERATED.values()) >= 5
    assert sum(n for label, n in GENERATED.items() if label.startswith("POST /v1/responses ")) >= 1
    # Leave no fuzzing batch running behind the tests that follow.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batches = http.get("/v1/batches", params={"limit": 100}).json()["data"]
        if all(b["status"] in ("completed", "failed", "expired", "cancelled") for b in batches):
            break
        time.sleep(1)
