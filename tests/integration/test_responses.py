"""OpenAI's Responses API (`/v1/responses`) from the outside: the official `openai` client
against real Redis, Celery workers and API processes with the fake engine (what is tested
is the contract and the queue's guarantees, not the model).

The fake engine's text is positional (" t<p>" for sequence position p, the prompt
included), so `expected_text(input_tokens, output_tokens)` is a response's whole answer:
a lost, repeated or reordered piece of it shows. Plain answers run to max_output_tokens,
so they end `incomplete` (reason `max_output_tokens`); a named tool_choice streams one
function call and ends `completed`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import httpx
import openai
import pytest
import redis as redis_lib

from common import keys
from tests.integration.test_batches import read_jsonl, upload, wait_batch
from tests.integration.test_job_core import record, wait
from worker.fake_engine import expected_text

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
ALICE, BOB = "sk-resp-alice-4c1d", "sk-resp-bob-8e2f"
STEP_SECONDS = 0.05  # one fake engine step (8 tokens)
LONG = 8 * 400  # max_output_tokens of a response that runs about 20 s unless cancelled
DURABLE = 8 * 500  # one that outlasts an API restart (about 10 s) with room to spare
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather somewhere.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        "strict": False,
    }
]
NAMED = {"type": "function", "name": "get_weather"}
FINAL_EVENTS = {"response.completed", "response.incomplete", "response.failed", "response.cancelled", "error"}


# Small, so the input-item limit is cheap to reach.
MAX_MESSAGES = 64


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    """Redis, two workers (w1, w2), two API processes on the same Redis (api, api2), with
    two API keys; short leases so a lost worker's job is taken back within seconds."""
    logs = tmp_path_factory.mktemp("responses-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": str(STEP_SECONDS),
            "API_KEYS": f"{ALICE},{BOB}",
            "HEARTBEAT_SECONDS": "0.5",
            "WORKER_TTL_SECONDS": "3",
            "LEASE_SECONDS": "2",
            "REAPER_INTERVAL_SECONDS": "0.5",
            "FILES_DIR": str(logs / "files"),
            "MAX_MESSAGES": str(MAX_MESSAGES),
        },
    )
    try:
        s.start_redis()
        s.start_worker("w1")
        s.start_worker("w2")
        s.start_api()
        s.start_api("api2", free_port())
        s.wait_ready(MODEL, timeout=120)
        s.wait_ready(MODEL, timeout=120, api="api2")
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def client_for(s: Stack, key: str = ALICE, api: str = "api") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url_of(api) + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alice(rs) -> openai.OpenAI:
    return client_for(rs)


@pytest.fixture(scope="module")
def alice2(rs) -> openai.OpenAI:
    """Alice on the second API process."""
    return client_for(rs, api="api2")


@pytest.fixture(scope="module")
def bob(rs) -> openai.OpenAI:
    return client_for(rs, BOB)


def read(
    stream: Any, until_deltas: int | None = None, delta: str = "response.output_text.delta"
) -> list[dict[str, Any]]:
    """A stream's events to its end, or (`until_deltas`) until that many `delta` events,
    then the connection is closed."""
    out: list[dict[str, Any]] = []
    deltas = 0
    try:
        for event in stream:
            out.append(event.to_dict())
            if event.type == delta:
                deltas += 1
                if until_deltas is not None and deltas >= until_deltas:
                    break
    finally:
        stream.close()
    return out


def check_sequence(events: list[dict[str, Any]], first: int = 0) -> None:
    assert [e["sequence_number"] for e in events] == list(range(first, first + len(events)))


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def final_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events and events[-1]["type"] in FINAL_EVENTS, [e["type"] for e in events[-3:]]
    return events[-1]


def status_code_of(call: Any) -> tuple[int, dict[str, Any]]:
    """Run a call that must fail: its HTTP status and error object."""
    with pytest.raises(openai.APIStatusError) as info:
        result = call()
        if isinstance(result, openai.Stream):  # a stream's status arrives with its first byte
            read(result)
    body = info.value.body if isinstance(info.value.body, dict) else {}
    return info.value.status_code, body.get("error", body)


def history_of(s: Stack, response_id: str) -> list[dict[str, Any]]:
    """The conversation before a response, as the job record in Redis holds it."""
    return json.loads(record(s, response_id)["response"])["history"]


def lose_the_worker_of(s: Stack, response_id: str) -> None:
    """SIGKILL the worker running a response, mid-answer (its whole process group), and
    start a new one under its name."""
    rec = record(s, response_id)
    assert rec["status"] == "in_progress" and rec["attempt"] == "1", "it ended before its worker could be lost"
    holder = rec["worker"].split("@")[0]
    s.kill(holder)
    s.start_worker(holder)


def wait_for_two_workers(s: Stack) -> None:
    """Until two workers have beaten within the last 1.5 s (heartbeat: 0.5 s)."""
    r = redis_lib.Redis.from_url(s.redis_url)
    wait(lambda: len(r.zrangebyscore(keys.WORKERS, time.time() - 1.5, "+inf")) >= 2, timeout=60)


def plain(client: openai.OpenAI, text: str = "hi", tokens: int = 16, **kw: Any) -> Any:
    return client.responses.create(model=MODEL, input=text, max_output_tokens=tokens, **kw)


# -- create, retrieve, stream, resume --------------------------------------------------


def test_create_plain_and_retrieve(alice):
    r = plain(alice, "hello there", 16, instructions="Be brief.", metadata={"team": "eval"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.instructions == "Be brief." and r.metadata == {"team": "eval"} and r.max_output_tokens == 16
    assert r.background is False and r.store is True and r.previous_response_id is None and r.error is None
    (message,) = r.output
    # Cut short by max_output_tokens: the last item is "incomplete", as OpenAI marks it.
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert r.usage.output_tokens == 16 and r.usage.total_tokens == r.usage.input_tokens + 16
    assert r.output_text == expected_text(r.usage.input_tokens, 16)
    # The stored response is the same object.
    assert alice.responses.retrieve(r.id).to_dict() == r.to_dict()
    items = alice.responses.input_items.list(r.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "hello there")]


def test_stream_and_resume_from_any_sequence_number(alice, alice2):
    stream = alice.responses.create(model=MODEL, input="count", max_output_tokens=40, stream=True)
    live = read(stream)
    check_sequence(live)
    types = [e["type"] for e in live]
    n_deltas = types.count("response.output_text.delta")
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert n_deltas == 5  # 40 tokens, 8 a step
    response_id = live[0]["response"]["id"]
    final = final_of(live)["response"]
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 40
    assert text_of(live) == expected_text(final["usage"]["input_tokens"], 40)
    done = next(e for e in live if e["type"] == "response.output_text.done")
    assert done["text"] == text_of(live)
    stored = alice.responses.retrieve(response_id)
    assert stored.to_dict() == final and stored.output_text == text_of(live)

    # A replay from the start, and from after any sequence number, on either API process:
    # exactly the events after it, as the uninterrupted stream sent them.
    assert read(alice.responses.retrieve(response_id, stream=True)) == live
    for n in (-1, 0, 1, 3, 5, len(live) - 2):
        assert read(alice.responses.retrieve(response_id, stream=True, starting_after=n)) == live[n + 1 :], n
        assert read(alice2.responses.retrieve(response_id, stream=True, starting_after=n)) == live[n + 1 :], n
    # From the last event on: nothing more.
    assert read(alice.responses.retrieve(response_id, stream=True, starting_after=len(live) - 1)) == []
    code, error = status_code_of(lambda: alice.responses.retrieve(response_id, stream=True, starting_after=-2))
    assert code == 400 and error["param"].endswith("starting_after")


def test_wire_format_event_lines_match_their_data(rs):
    """Each SSE event has `event: <type>` and `data: <json>` with that type."""
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 16, "stream": True}
    pairs: list[tuple[str | None, dict[str, Any]]] = []
    with httpx.stream(
        "POST", rs.api_url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        name: str | None = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                pairs.append((name, json.loads(line[5:].strip())))
                name = None
    assert pairs and all(name == data["type"] for name, data in pairs)
    assert pairs[-1][1]["type"] == "response.incomplete"


def test_a_bad_query_parameter_is_named_as_sent(alice):
    r = plain(alice, "q", 8)
    code, error = status_code_of(lambda: alice.responses.retrieve(r.id, stream=True, starting_after=-2))
    assert (code, error["param"]) == (400, "starting_after")


def test_input_items_in_pages(alice):
    r = alice.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "d"},
            {"role": "user", "content": "a"},
            {"type": "message", "role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
        ],
        max_output_tokens=8,
    )
    # Newest first by default; the client pages through them with `after`.
    assert [i.content[0].text for i in alice.responses.input_items.list(r.id, limit=1)] == ["c", "b", "a", "d"]
    page = alice.responses.input_items.list(r.id, order="asc", limit=2)
    assert [(i.role, i.content[0].text) for i in page.data] == [("developer", "d"), ("user", "a")]
    assert page.has_more and page.last_id == page.data[-1].id
    rest = alice.responses.input_items.list(r.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["b", "c"] and not rest.has_more
    assert rest.data[0].content[0].type == "output_text"  # an assistant message's text is output
    before = alice.responses.input_items.list(r.id, order="asc", extra_query={"before": rest.data[0].id})
    assert [i.id for i in before.data] == [i.id for i in page.data]
    code, error = status_code_of(lambda: alice.responses.input_items.list(r.id, after="msg_nope"))
    assert (code, error["param"]) == (400, "after")


def test_leaving_an_ordinary_stream_cancels_its_response(rs, alice):
    seen = read(alice.responses.create(model=MODEL, input="bye", max_output_tokens=LONG, stream=True), 2)
    response_id = seen[0]["response"]["id"]
    wait(lambda: record(rs, response_id).get("status") == "cancelled")
    r = alice.responses.retrieve(response_id)
    assert r.status == "cancelled" and r.usage.output_tokens < LONG
    assert r.output_text.startswith(text_of(seen))


def test_background_create_then_retrieve(alice):
    r = alice.responses.create(model=MODEL, input="later", max_output_tokens=24, background=True)
    assert r.id.startswith("resp_") and r.background is True and r.status in ("queued", "in_progress")
    done = wait(lambda: (x := alice.responses.retrieve(r.id)).status not in ("queued", "in_progress") and x)
    assert done.status == "incomplete" and done.background is True
    assert done.output_text == expected_text(done.usage.input_tokens, 24)
    # Its stream, from the start, after it ended: created (queued) ... incomplete.
    events = read(alice.responses.retrieve(r.id, stream=True))
    check_sequence(events)
    assert events[0]["type"] == "response.created" and events[0]["response"]["status"] == "queued"
    assert final_of(events)["response"] == done.to_dict()


def test_stream_helper_resumes_after_a_sequence_number(alice):
    r = alice.responses.create(model=MODEL, input="helper", max_output_tokens=8 * 30, background=True)
    # Retrieved while it runs: what it said so far, its message still in progress.
    running = wait(lambda: (x := alice.responses.retrieve(r.id)).output and x)
    assert running.status == "in_progress" and running.output[0].status == "in_progress"
    assert running.usage is None and running.output_text
    # While it runs: the helper replays from the start and hands over what follows N.
    with alice.responses.stream(response_id=r.id, starting_after=3) as stream:
        helped = [(e.type, e.sequence_number, getattr(e, "delta", None)) for e in stream]
    whole = read(alice.responses.retrieve(r.id, stream=True))
    assert helped == [(e["type"], e["sequence_number"], e.get("delta")) for e in whole[4:]]
    assert helped[-1][0] == "response.incomplete"
    assert text_of(whole) == alice.responses.retrieve(r.id).output_text
    assert text_of(whole).startswith(running.output_text)


# -- cancel and delete -----------------------------------------------------------------


def test_cancel_a_running_response_twice_and_its_follower_ends(rs, alice, alice2):
    r = alice.responses.create(model=MODEL, input="a long one", max_output_tokens=LONG, background=True)
    following = threading.Event()
    followed: list[dict[str, Any]] = []

    def follow() -> None:  # on the other API process
        stream = alice2.responses.retrieve(r.id, stream=True)
        try:
            for event in stream:
                followed.append(event.to_dict())
                if event.type == "response.output_text.delta":
                    following.set()
        finally:
            stream.close()
            following.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert following.wait(30) and follower.is_alive()
    # A conversation cannot go on from a response still running.
    code, error = status_code_of(lambda: plain(alice, "next", 8, previous_response_id=r.id))
    assert (code, error["param"]) == (400, "previous_response_id")
    first = alice.responses.cancel(r.id)
    assert first.status == "cancelled" and first.error is None
    second = alice.responses.cancel(r.id)  # idempotent: the same response, no error
    assert second.to_dict() == first.to_dict()
    assert alice.responses.retrieve(r.id).to_dict() == first.to_dict()
    assert alice2.responses.cancel(r.id).to_dict() == first.to_dict()
    # It stopped early, with what it had said so far.
    text = first.output_text
    assert text and expected_text(first.usage.input_tokens, LONG).startswith(text)
    assert first.usage.output_tokens < LONG
    assert record(rs, r.id)["status"] == "cancelled"

    follower.join(30)
    assert not follower.is_alive()
    check_sequence(followed)
    last = final_of(followed)
    assert last["type"] == "response.cancelled" and last["response"] == first.to_dict()
    assert text_of(followed) == text
    assert read(alice.responses.retrieve(r.id, stream=True)) == followed


def test_two_cancels_at_once_on_two_api_processes_agree(alice, alice2):
    r = alice.responses.create(model=MODEL, input="race", max_output_tokens=LONG, background=True)
    wait(lambda: alice.responses.retrieve(r.id).output)
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda c=c: results.append(c.responses.cancel(r.id).to_dict())) for c in (alice, alice2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1] and results[0]["status"] == "cancelled"
    assert alice.responses.retrieve(r.id).to_dict() == results[0]


def test_cancel_of_an_ended_response_returns_it_as_it_is(alice):
    r = plain(alice, "done already", 8)
    assert r.status == "incomplete"
    cancelled = alice.responses.cancel(r.id)
    assert cancelled.to_dict() == r.to_dict()
    assert alice.responses.cancel(r.id).to_dict() == r.to_dict()


def test_delete_forgets_a_response(rs, alice):
    r = plain(alice, "forget me", 8)
    alice.responses.delete(r.id)
    calls = {
        "retrieve": lambda: alice.responses.retrieve(r.id),
        "stream": lambda: alice.responses.retrieve(r.id, stream=True),
        "stream after": lambda: alice.responses.retrieve(r.id, stream=True, starting_after=2),
        "input_items": lambda: alice.responses.input_items.list(r.id),
        "cancel": lambda: alice.responses.cancel(r.id),
        "delete": lambda: alice.responses.delete(r.id),
        "previous_response_id": lambda: plain(alice, "next", 8, previous_response_id=r.id),
    }
    for what, call in calls.items():
        code, error = status_code_of(call)
        assert code == 404, (what, error)
    code, error = status_code_of(calls["previous_response_id"])
    assert error["param"] == "previous_response_id" and error["code"] == "previous_response_not_found"


def test_input_items_are_limited_before_anything_is_stored(rs, alice):
    """Every input item is stored with the response, so their number is limited as chat's
    messages are, even where they make fewer messages (reasoning items make none): 20,000
    reasoning items were stored whole (52 MB) and made every GET slow."""
    items: list[dict[str, Any]] = [{"type": "reasoning", "summary": []}] * (MAX_MESSAGES - 1)
    ok = alice.responses.create(model=MODEL, input=[*items[1:], {"role": "user", "content": "hi"}], max_output_tokens=4)
    assert ok.status == "incomplete"
    code, error = status_code_of(
        lambda: alice.responses.create(model=MODEL, input=[*items, {"role": "user", "content": "hi"}])
    )
    assert (code, error["param"], error["code"]) == (400, "input", "array_above_max_length"), error


def test_an_ended_response_is_kept_whole_and_read_from_its_record(rs, alice):
    """Reading an ended response replays its log once; after that, the object is kept in
    its record (a GET of a long answer replayed the whole log every time)."""
    r = plain(alice, "keep me", 24)

    def raw(call: Any) -> dict[str, Any]:
        return call(r.id).http_response.json()  # type: ignore[no-any-return]

    first = raw(alice.responses.with_raw_response.retrieve)
    assert json.loads(record(rs, r.id)["response_final"]) == first
    redis_lib.Redis.from_url(rs.redis_url).delete(keys.job_log(r.id))  # no log to replay now
    assert raw(alice.responses.with_raw_response.retrieve) == first
    assert raw(alice.responses.with_raw_response.cancel) == first


def test_repeated_input_item_ids_page_to_the_end(alice):
    """Clients (the Agents SDK) may send one fake id on every item: the pages still end."""
    items = [{"id": "__fake_id__", "role": "user", "content": f"m{i}"} for i in range(7)]
    r = alice.responses.create(model=MODEL, input=items, max_output_tokens=4)
    listed = list(alice.responses.input_items.list(r.id, limit=2))
    assert [i.content[0].text for i in listed] == [f"m{i}" for i in reversed(range(7))]
    assert len({i.id for i in listed}) == 7


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "name": "f", "description": 5}]}, "tools.0.description"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "description": 5}}},
            "text.format.description",
        ),
        ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools.0.strict"),
    ],
)
def test_errors_name_the_responses_field(alice, extra, param):
    """A 400 the chat request behind a response raises names the Responses field."""
    code, error = status_code_of(lambda: plain(alice, "x", 4, extra_body=extra))
    assert (code, error["param"]) == (400, param), error
    assert error["message"].startswith(param), error


def test_delete_of_a_running_response_cancels_it(rs, alice):
    r = alice.responses.create(model=MODEL, input="running", max_output_tokens=LONG, background=True)
    wait(lambda: record(rs, r.id).get("status") == "in_progress")
    alice.responses.delete(r.id)
    assert status_code_of(lambda: alice.responses.retrieve(r.id))[0] == 404
    assert status_code_of(lambda: alice.responses.retrieve(r.id, stream=True))[0] == 404
    wait(lambda: record(rs, r.id).get("status", "cancelled") == "cancelled")


# -- conversations and tools ----------------------------------------------------------


def test_three_turns_by_previous_response_id(rs, alice, alice2):
    one = plain(alice, "My name is Ann.", 16, instructions="Answer in one word.")
    two = plain(alice2, "What is my name?", 16, previous_response_id=one.id)
    three = alice.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "And again?"}]}],
        max_output_tokens=16,
        previous_response_id=two.id,
    )
    assert (two.previous_response_id, three.previous_response_id) == (one.id, two.id)
    for r in (one, two, three):
        assert r.status == "incomplete" and r.output_text == expected_text(r.usage.input_tokens, 16)
    # The worker got the earlier turns: each prompt holds the one before and its answer.
    assert one.usage.input_tokens + 16 < two.usage.input_tokens
    assert two.usage.input_tokens + 16 < three.usage.input_tokens
    assert history_of(rs, one.id) == []
    assert history_of(rs, two.id) == [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": one.output_text},
    ]  # the instructions are not carried on
    assert history_of(rs, three.id) == [
        *history_of(rs, two.id),
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": two.output_text},
    ]
    # input_items: each response's own input.
    items = alice.responses.input_items.list(three.id, order="asc").data
    assert [(i.type, i.role, [c.text for c in i.content]) for i in items] == [("message", "user", ["And again?"])]
    assert [i.content[0].text for i in alice2.responses.input_items.list(two.id).data] == ["What is my name?"]


def test_function_call_round_trip(rs, alice):
    call_r = alice.responses.create(
        model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice=NAMED, max_output_tokens=24
    )
    assert call_r.status == "completed" and call_r.incomplete_details is None
    (call,) = call_r.output
    assert call.type == "function_call" and call.status == "completed" and call.name == "get_weather"
    assert call.call_id.startswith("chatcmpl-tool-") and call.id
    assert json.loads(call.arguments) == {"text": expected_text(call_r.usage.input_tokens, 24)}
    assert call_r.tools[0].name == "get_weather" and call_r.tool_choice.name == "get_weather"

    answer = alice.responses.create(
        model=MODEL,
        previous_response_id=call_r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tools=TOOLS,
        max_output_tokens=16,
    )
    assert answer.status == "incomplete" and answer.output_text == expected_text(answer.usage.input_tokens, 16)
    assert answer.usage.input_tokens > call_r.usage.input_tokens
    (item,) = alice.responses.input_items.list(answer.id).data
    assert (item.type, item.call_id, item.output) == ("function_call_output", call.call_id, '{"temperature": 21}')
    history = history_of(rs, answer.id)
    assert history[-1]["role"] == "assistant" and history[-1]["tool_calls"] == [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    ]


def test_streamed_function_call_and_the_helpers_final_response(alice):
    with alice.responses.stream(
        model=MODEL, input="Weather?", tools=TOOLS, tool_choice=NAMED, max_output_tokens=24
    ) as stream:
        events = [e.to_dict() for e in stream]
        final = stream.get_final_response()
    types = [e["type"] for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["name"] == "get_weather" and added["arguments"] == ""
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert events[-3]["arguments"] == arguments and events[-2]["item"]["arguments"] == arguments
    (call,) = final.output
    assert call.call_id == added["call_id"] and call.arguments == arguments
    # The helper's own field aside, the last event's response is the stored response, and
    # so is a replay's (completed_at included: the stream's was null).
    for item in events[-1]["response"]["output"]:
        item.pop("parsed_arguments", None)
    stored = alice.responses.retrieve(final.id).to_dict()
    assert stored["completed_at"] is not None
    assert events[-1]["response"] == stored
    assert final_of(read(alice.responses.retrieve(final.id, stream=True)))["response"] == stored


def test_store_false_answers_but_keeps_nothing(alice):
    r = plain(alice, "ephemeral", 16, store=False)
    assert r.store is False and r.output_text == expected_text(r.usage.input_tokens, 16)
    for call in (
        lambda: alice.responses.retrieve(r.id),
        lambda: alice.responses.retrieve(r.id, stream=True),
        lambda: alice.responses.input_items.list(r.id),
        lambda: plain(alice, "next", 8, previous_response_id=r.id),
    ):
        assert status_code_of(call)[0] == 404
    streamed = read(alice.responses.create(model=MODEL, input="x", max_output_tokens=8, store=False, stream=True))
    assert final_of(streamed)["type"] == "response.incomplete"
    assert status_code_of(lambda: alice.responses.retrieve(streamed[0]["response"]["id"]))[0] == 404
    code, error = status_code_of(lambda: plain(alice, "bg", 8, store=False, background=True))
    assert code == 400 and error["param"] == "background"


# -- refusals and ownership ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [*TOOLS, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools.1.type"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is in this image?"},
                            {"type": "input_image", "image_url": "https://example.com/cat.png"},
                        ],
                    }
                ]
            },
            "input.0.content.1.type",
        ),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"conversation": "conv_123"}, "conversation"),
    ],
    ids=["web_search", "file_search", "input_image", "include", "conversation"],
)
def test_refused_parameters_are_a_400_naming_them(alice, extra, param):
    kw = {"model": MODEL, "input": "hi", "max_output_tokens": 8, **extra}
    code, error = status_code_of(lambda: alice.responses.create(**kw))
    assert (code, error.get("param")) == (400, param), error


def test_responses_and_chat_completions_keep_apart(rs, alice):
    """A response is no chat completion job, and a chat completion no response."""
    r = plain(alice, "apart", 8)
    chat = alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8)
    headers = {"Authorization": f"Bearer {ALICE}"}
    for path in (f"/v1/chat/completions/{r.id}", f"/v1/chat/completions/{r.id}/stream"):
        assert httpx.get(rs.api_url + path, headers=headers, timeout=10).status_code == 404, path
    assert httpx.post(rs.api_url + f"/v1/chat/completions/{r.id}/cancel", headers=headers).status_code == 404
    assert status_code_of(lambda: alice.responses.retrieve(chat.id))[0] == 404
    assert status_code_of(lambda: alice.responses.cancel(chat.id))[0] == 404
    assert status_code_of(lambda: plain(alice, "x", 8, previous_response_id=chat.id))[0] == 404


def test_a_missing_previous_response_is_a_404(alice):
    code, error = status_code_of(lambda: plain(alice, "hi", 8, previous_response_id="resp_0123456789abcdef"))
    assert code == 404
    assert error["param"] == "previous_response_id" and error["code"] == "previous_response_not_found"


def test_another_key_cannot_see_a_response(rs, alice, bob):
    r = alice.responses.create(model=MODEL, input="mine", max_output_tokens=8 * 40, background=True)
    for what, call in {
        "retrieve": lambda: bob.responses.retrieve(r.id),
        "stream": lambda: bob.responses.retrieve(r.id, stream=True, starting_after=0),
        "input_items": lambda: bob.responses.input_items.list(r.id),
        "cancel": lambda: bob.responses.cancel(r.id),
        "delete": lambda: bob.responses.delete(r.id),
        "previous_response_id": lambda: plain(bob, "yours?", 8, previous_response_id=r.id),
    }.items():
        assert status_code_of(call)[0] == 404, what
    assert alice.responses.retrieve(r.id).status in ("queued", "in_progress")  # bob cancelled nothing
    done = wait(lambda: (x := alice.responses.retrieve(r.id)).status == "incomplete" and x)
    assert done.output_text == expected_text(done.usage.input_tokens, 8 * 40)
    assert status_code_of(lambda: client_for(rs, "sk-nobody").responses.retrieve(r.id))[0] == 401


# -- processes: two APIs, restarts, a lost worker -------------------------------------


def test_resume_on_another_api_process(alice, alice2):
    """A background stream created on api2, dropped after a few events and resumed on
    api with starting_after: exactly the rest, live."""
    stream = alice2.responses.create(
        model=MODEL, input="across", max_output_tokens=8 * 40, background=True, stream=True
    )
    seen = read(stream, until_deltas=3)
    response_id, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    rest = read(alice.responses.retrieve(response_id, stream=True, starting_after=last))
    check_sequence(seen + rest)
    assert rest[0]["sequence_number"] == last + 1 and final_of(rest)["type"] == "response.incomplete"
    assert seen + rest == read(alice2.responses.retrieve(response_id, stream=True))
    assert seen + rest == read(alice.responses.retrieve(response_id, stream=True))
    stored = alice.responses.retrieve(response_id)
    assert text_of(seen + rest) == stored.output_text == expected_text(stored.usage.input_tokens, 8 * 40)


def test_durable_across_an_api_restart_and_a_lost_worker(rs):
    """A background stream dropped after a few events; the API is restarted and the worker
    running the response is SIGKILLed mid-answer (another takes it over). Resumed from
    the last sequence number seen: exactly the remaining events, whole and in order, and a
    chain of previous_response_id made before the restart goes on after it."""
    client = client_for(rs)
    before = plain(client, "before the restart", 16)
    stream = client.responses.create(
        model=MODEL, input="durable", max_output_tokens=DURABLE, background=True, stream=True
    )
    seen = read(stream, until_deltas=3)
    response_id, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    assert seen[0]["response"]["status"] == "queued"

    rs.restart("api")  # starting an API process takes about 10 s here
    rs.wait_ready(MODEL, timeout=60)
    lose_the_worker_of(rs, response_id)

    client = client_for(rs)  # a new client: new connections to the restarted API
    rest = read(client.responses.retrieve(response_id, stream=True, starting_after=last))
    assert rest[0]["sequence_number"] == last + 1
    check_sequence(seen + rest)
    assert final_of(rest)["type"] == "response.incomplete"
    assert int(record(rs, response_id)["attempt"]) >= 2  # the answer was taken over
    assert seen + rest == read(client.responses.retrieve(response_id, stream=True))
    stored = client.responses.retrieve(response_id)
    assert final_of(rest)["response"] == stored.to_dict()
    assert text_of(seen + rest) == stored.output_text == expected_text(stored.usage.input_tokens, DURABLE)

    after = plain(client, "after the restart", 16, previous_response_id=before.id)
    assert after.previous_response_id == before.id and after.usage.input_tokens > before.usage.input_tokens + 16
    assert history_of(rs, after.id)[-1] == {"role": "assistant", "content": before.output_text}
    wait_for_two_workers(rs)


def test_a_lost_workers_function_call_starts_over_and_its_reader_is_told(rs):
    """A function call cannot continue from text: when its worker is SIGKILLed mid-
    arguments it starts over. The reader that had part of the first attempt's arguments,
    resumed after its last sequence number, gets the rest of what it has and then an
    `error` event (`worker_lost`), never the second attempt's fragments after the first's;
    a reader from the start gets the last attempt whole, with the same sequence numbers."""
    client = client_for(rs)
    tokens = 8 * 100
    stream = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=TOOLS,
        tool_choice=NAMED,
        max_output_tokens=tokens,
        background=True,
        stream=True,
    )
    seen = read(stream, until_deltas=3, delta="response.function_call_arguments.delta")
    response_id, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    lose_the_worker_of(rs, response_id)

    rest = read(client.responses.retrieve(response_id, stream=True, starting_after=last))
    check_sequence(seen + rest)
    lost = rest[-1]
    assert (lost["type"], lost["code"]) == ("error", "worker_lost"), [e["type"] for e in rest[-3:]]
    assert {e["type"] for e in rest[:-1]} <= {"response.function_call_arguments.delta"}

    done = wait(lambda: (x := client.responses.retrieve(response_id)).status != "in_progress" and x)
    assert done.status == "completed" and int(record(rs, response_id)["attempt"]) >= 2
    (call,) = done.output
    assert json.loads(call.arguments) == {"text": expected_text(done.usage.input_tokens, tokens)}
    whole = read(client.responses.retrieve(response_id, stream=True))
    numbers = [e["sequence_number"] for e in whole]
    assert numbers == sorted(set(numbers))
    assert final_of(whole)["type"] == "response.completed" and final_of(whole)["response"] == done.to_dict()
    arguments = "".join(e["delta"] for e in whole if e["type"] == "response.function_call_arguments.delta")
    assert arguments == call.arguments and [e["type"] for e in whole].count("response.output_item.added") == 1
    # The same numbers for every reader: the worker_lost error stands where the last
    # attempt's output begins for a reader from the start.
    assert next(n for n in numbers if n >= lost["sequence_number"]) == lost["sequence_number"]
    # A reader that had none of the first attempt's output gets the last one's whole.
    assert read(client.responses.retrieve(response_id, stream=True, starting_after=1)) == whole[2:]
    wait_for_two_workers(rs)


# -- batches ---------------------------------------------------------------------------


def test_a_batch_of_responses(rs, alice):
    def line(custom_id: str, **body: Any) -> dict[str, Any]:
        body = {"model": MODEL, "input": f"line {custom_id}", "max_output_tokens": 16, **body}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body}

    lines = [line(f"ok-{i}") for i in range(4)]
    lines.append(line("tool", tools=TOOLS, tool_choice=NAMED))
    lines.append(line("web", tools=[{"type": "web_search"}]))
    lines.append(line("image", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]))
    batch = alice.batches.create(input_file_id=upload(alice, lines), endpoint="/v1/responses", completion_window="24h")
    assert batch.endpoint == "/v1/responses"
    batch = wait_batch(alice, batch.id, timeout=60)
    assert batch.status == "completed", batch.errors
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 5, 2)
    out = {o["custom_id"]: o for o in read_jsonl(alice, batch.output_file_id)}
    assert sorted(out) == ["ok-0", "ok-1", "ok-2", "ok-3", "tool"]
    for custom_id, o in out.items():
        assert o["response"]["status_code"] == 200 and o["error"] is None
        body = o["response"]["body"]
        assert body["object"] == "response" and body["id"] == o["response"]["request_id"]
        assert body["id"].startswith("resp_") and body["model"] == MODEL
        usage = body["usage"]
        if custom_id == "tool":
            (call,) = body["output"]
            assert body["status"] == "completed" and call["type"] == "function_call"
            assert json.loads(call["arguments"]) == {"text": expected_text(usage["input_tokens"], 16)}
        else:
            (message,) = body["output"]
            assert body["status"] == "incomplete" and message["type"] == "message"
            assert message["content"][0]["text"] == expected_text(usage["input_tokens"], 16)
        # A batch line's response is a stored response of the batch's owner, the same object.
        assert alice.responses.retrieve(body["id"]).to_dict() == body
    errors = {e["custom_id"]: e for e in read_jsonl(alice, batch.error_file_id)}
    assert errors["web"]["response"]["status_code"] == 400
    assert errors["web"]["response"]["body"]["error"]["param"] == "tools.0.type"
    assert errors["image"]["response"]["status_code"] == 400
    assert errors["image"]["response"]["body"]["error"]["param"] == "input.0.content.0.type"
