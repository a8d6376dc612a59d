"""The API's metrics without services (api/metrics.py): the request middleware's labels
(route templates, never raw paths; rejections by reason; open streams) on a tiny app, the
Prometheus service-discovery JSON, and the queue gauges rendered from a fixed snapshot,
read back with prometheus_client's parser."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from api.main import create_app
from api.metrics import (
    OPEN_STREAMS,
    MetricsMiddleware,
    QueueSnapshot,
    build_snapshot,
    render,
    sd_targets,
)
from common.jobs import WorkerInfo
from common.settings import Settings


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Refuse401:
    """Like api.auth.AuthMiddleware: answers a 401 itself, before routing, without a key."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(k == b"authorization" for k, _ in scope["headers"]):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await self.app(scope, receive, send)


def error(status: int, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": "no", "type": "requests", "param": None, "code": code}}, status)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = FastAPI()
    seen_open: list[float] = []
    app.state.seen_open = seen_open

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    @app.post("/items")
    async def create() -> JSONResponse:
        return error(400, "bad")

    @app.get("/full")
    async def full() -> JSONResponse:
        return error(429, "engine_overloaded")

    @app.get("/limited")
    async def limited() -> JSONResponse:
        return error(429, "rate_limit_exceeded")

    @app.get("/big")
    async def big() -> JSONResponse:
        return error(413, "request_too_large")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def gen() -> Iterator[str]:  # type: ignore[misc]
            seen_open.append(OPEN_STREAMS._value.get())
            yield "data: 1\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app.add_middleware(Refuse401)
    app.add_middleware(MetricsMiddleware)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer k"}) as c:
        yield c


def test_requests_are_counted_by_route_template_never_the_raw_path(client: TestClient) -> None:
    before = sample("llmq_http_requests_total", route="/items/{item_id}", method="GET", status="200")
    before_hist = sample("llmq_http_request_duration_seconds_count", route="/items/{item_id}", method="GET")
    for i in range(3):
        assert client.get(f"/items/abc{i}").status_code == 200
    assert sample("llmq_http_requests_total", route="/items/{item_id}", method="GET", status="200") == before + 3
    assert sample("llmq_http_request_duration_seconds_count", route="/items/{item_id}", method="GET") == (
        before_hist + 3
    )
    families = {f.name: f for f in text_string_to_metric_families(render(None).decode())}
    routes = {s.labels["route"] for s in families["llmq_http_requests"].samples if "route" in s.labels}
    assert not any("abc" in r for r in routes), routes


def test_unmatched_paths_are_other_and_a_405_keeps_its_route(client: TestClient) -> None:
    other = sample("llmq_http_requests_total", route="other", method="GET", status="404")
    not_found = sample("llmq_rejections_total", reason="not_found")
    assert client.get("/no/such/path-123").status_code == 404
    assert sample("llmq_http_requests_total", route="other", method="GET", status="404") == other + 1
    assert sample("llmq_rejections_total", reason="not_found") == not_found + 1
    wrong = sample("llmq_http_requests_total", route="/items/{item_id}", method="DELETE", status="405")
    assert client.delete("/items/x").status_code == 405
    assert sample("llmq_http_requests_total", route="/items/{item_id}", method="DELETE", status="405") == wrong + 1
    odd = sample("llmq_http_requests_total", route="/items/{item_id}", method="other", status="405")
    assert client.request("FROBNICATE", "/items/x").status_code == 405
    assert sample("llmq_http_requests_total", route="/items/{item_id}", method="other", status="405") == odd + 1


def test_a_401_answered_before_routing_is_counted_on_its_route(client: TestClient) -> None:
    before = sample("llmq_http_requests_total", route="/items/{item_id}", method="GET", status="401")
    auth = sample("llmq_rejections_total", reason="auth")
    anonymous = TestClient(client.app, raise_server_exceptions=False)
    assert anonymous.get("/items/x").status_code == 401
    assert sample("llmq_rejections_total", reason="auth") == auth + 1
    assert sample("llmq_http_requests_total", route="/items/{item_id}", method="GET", status="401") == before + 1


@pytest.mark.parametrize(
    ("path", "method", "reason"),
    [
        ("/full", "GET", "overloaded"),
        ("/limited", "GET", "rate_limit"),
        ("/big", "GET", "too_large"),
        ("/items", "POST", "validation"),
    ],
)
def test_rejections_by_reason(client: TestClient, path: str, method: str, reason: str) -> None:
    before = {
        r: sample("llmq_rejections_total", reason=r) for r in ("overloaded", "rate_limit", "too_large", "validation")
    }
    client.request(method, path)
    after = {r: sample("llmq_rejections_total", reason=r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {r: 1.0 if r == reason else 0.0 for r in before}


def test_an_exception_counts_as_a_500(client: TestClient) -> None:
    before = sample("llmq_http_requests_total", route="/boom", method="GET", status="500")
    assert client.get("/boom").status_code == 500
    assert sample("llmq_http_requests_total", route="/boom", method="GET", status="500") == before + 1


def test_an_sse_response_is_an_open_stream_while_it_is_sent(client: TestClient) -> None:
    base = OPEN_STREAMS._value.get()
    assert client.get("/events").text == "data: 1\n\n"
    assert client.app.state.seen_open[-1] == base + 1  # type: ignore[attr-defined]
    assert OPEN_STREAMS._value.get() == base


# -- service discovery -------------------------------------------------------------------


def worker(wid: str, model: str = "m", url: str | None = None, slots: int = 4, inflight: int = 0) -> WorkerInfo:
    return WorkerInfo(id=wid, model=model, slots=slots, started=0.0, inflight=inflight, metrics_url=url)


def test_sd_targets_list_each_worker_that_serves_metrics() -> None:
    groups = sd_targets(
        [
            worker("w2@b", "m2", "http://10.0.0.2:9100/metrics"),
            worker("w1@a", "m1", "http://10.0.0.1:41234/metrics"),
            worker("w3@c", "m1", None),
            worker("w4@d", "m1", "https://[fd00::4]:9443/custom"),
        ]
    )
    assert json.loads(json.dumps(groups)) == [
        {"targets": ["10.0.0.1:41234"], "labels": {"__metrics_path__": "/metrics", "model": "m1", "worker": "w1@a"}},
        {"targets": ["10.0.0.2:9100"], "labels": {"__metrics_path__": "/metrics", "model": "m2", "worker": "w2@b"}},
        {
            "targets": ["[fd00::4]:9443"],
            "labels": {"__metrics_path__": "/custom", "model": "m1", "worker": "w4@d", "__scheme__": "https"},
        },
    ]
    assert sd_targets([]) == []


# -- the queue snapshot --------------------------------------------------------------------


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


QUEUE_GAUGES = {
    "llmq_queue_waiting_jobs",
    "llmq_queue_oldest_wait_seconds",
    "llmq_batch_lines_pending",
    "llmq_batch_lines_in_flight",
    "llmq_workers_live",
    "llmq_slots_capacity",
    "llmq_slots_in_use",
}


def snapshot(now: float = 1_000_000.0) -> QueueSnapshot:
    return build_snapshot(
        workers=[
            worker("a1", "A", slots=4, inflight=3),
            worker("a2", "A", slots=2, inflight=0),
            worker("b1", "B", slots=8, inflight=8),
        ],
        per_model={
            "A": (5, now - 30.0, 2, 1),  # 5 waiting (oldest 30 s), 2 batch lines in flight, 1 queued
            "C": (2, now - 10.0, 0, 0),  # waiting, no worker
            "D": (0, None, 0, 0),  # seen once, nothing now: left out
        },
        batches=[("in_progress", 10, 4), ("cancelling", 5, 1), ("validating", 0, 0), (None, 0, 0)],
        now=now,
    )


def test_queue_gauges_from_a_fixed_snapshot() -> None:
    got = gauges(render(snapshot()).decode())
    expected = {
        ("llmq_queue_waiting_jobs", "A", "interactive"): 5,
        ("llmq_queue_waiting_jobs", "A", "batch"): 1,
        ("llmq_queue_waiting_jobs", "B", "interactive"): 0,
        ("llmq_queue_waiting_jobs", "C", "interactive"): 2,
        ("llmq_queue_oldest_wait_seconds", "A"): 30.0,
        ("llmq_queue_oldest_wait_seconds", "B"): 0.0,
        ("llmq_queue_oldest_wait_seconds", "C"): 10.0,
        ("llmq_batch_lines_in_flight", "A"): 2,
        ("llmq_workers_live", "A"): 2,
        ("llmq_workers_live", "B"): 1,
        ("llmq_workers_live", "C"): 0,
        ("llmq_slots_capacity", "A"): 6,
        ("llmq_slots_capacity", "B"): 8,
        ("llmq_slots_in_use", "A"): 3,
        ("llmq_slots_in_use", "B"): 8,
        ("llmq_slots_in_use", "C"): 0,
        ("llmq_batch_lines_pending", ""): 6,  # only the running batch's lines not handed out
    }
    for key, value in expected.items():
        name, model, *priority = key
        labels = {"model": model, **({"priority": priority[0]} if priority else {})}
        assert got[(name, tuple(sorted(labels.items())))] == value, key
    models = {dict(labels).get("model") for name, labels in got if name == "llmq_workers_live"}
    assert models == {"A", "B", "C"}  # D (nothing live, nothing waiting) is left out


def test_without_a_snapshot_only_the_process_metrics_are_served() -> None:
    names = {f.name for f in text_string_to_metric_families(render(None).decode())}
    assert "llmq_http_requests" in names and "llmq_time_to_first_token_seconds" in names
    assert not names & QUEUE_GAUGES
    assert QUEUE_GAUGES <= {f.name for f in text_string_to_metric_families(render(snapshot()).decode())}


def test_build_snapshot_oldest_wait_is_never_negative() -> None:
    snap = build_snapshot([], {"A": (1, time.time() + 5, 0, 0)}, [], now=time.time())
    assert snap.models["A"].oldest_wait_seconds == 0.0


# -- who may read the metrics ------------------------------------------------------------


@pytest.mark.parametrize("require", [False, True])
def test_metrics_are_public_unless_a_key_is_required(require: bool) -> None:
    app = create_app(Settings(api_keys="sk-unit-test-key", metrics_require_key=require))
    # No lifespan (no Redis): a public path gets past the key check and fails later (500).
    c = TestClient(app, raise_server_exceptions=False)
    for path in ("/metrics", "/metrics/targets"):
        status = c.get(path).status_code
        assert (status == 401) == require, (path, status)
    assert c.get("/v1/models").status_code == 401


def test_forgetting_a_dead_process_another_forgot_first_is_not_an_error(tmp_path, monkeypatch):
    """Two API processes replacing two dead ones at once both forget the same pid: the
    second finds its file gone. That must not fail its start (uvicorn's supervisor then
    stops the whole API)."""
    from prometheus_client import multiprocess

    from api import metrics

    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f"gauge_livesum_{dead}.db").write_bytes(b"")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))

    def removed_by_the_other(pid: int, path: str) -> None:
        raise FileNotFoundError(f"{path}/gauge_livesum_{pid}.db")

    monkeypatch.setattr(multiprocess, "mark_process_dead", removed_by_the_other)
    assert metrics.forget_dead_processes() == []
