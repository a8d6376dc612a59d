"""The API app: `uvicorn api.main:app`, run as API_PROCESSES processes on one port by
`python -m api.serve`. Builds, once per process in the lifespan, the shared Redis client,
the stream relay, the model catalog, the job queue, the job pipeline with its endpoint
adapters, the batch runner and the reaper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.admission import Admission
from api.auth import PUBLIC_PATHS, AuthMiddleware, KeyRing
from api.batches.runner import BatchRunner
from api.batches.service import BatchService
from api.catalog import ModelCatalog
from api.endpoints.chat import ChatAdapter
from api.endpoints.completions import CompletionAdapter
from api.endpoints.responses import ResponsesAdapter
from api.errors import install_error_handlers
from api.files import FileStore
from api.jobs.pipeline import JobPipeline
from api.limits import install_limits
from api.metrics import METRICS_PATHS, MetricsMiddleware, forget_dead_processes
from api.metrics import router as metrics_router
from api.openapi import customize_openapi
from api.relay import StreamRelay
from api.request_log import RequestLogMiddleware
from api.routes import batches as batch_routes
from api.routes import chat, completions, health, models, responses
from api.routes import files as file_routes
from common import keys
from common.heap import freeze_startup_heap
from common.job_queue import JobQueue
from common.logs import setup_logging
from common.reaper import Reaper
from common.redis_client import connect
from common.settings import Settings, get_settings
from common.tasks import cancel_and_wait


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Several API processes (api.serve): open streams of a sibling that died are not open.
        forget_dead_processes()
        redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_seconds)
        relay = StreamRelay(settings.redis_url, settings.stream_buffer_events)
        catalog = ModelCatalog(redis, settings.worker_ttl_seconds)
        queue = JobQueue(settings.redis_url, settings.broker_visibility_timeout)
        admission = Admission(settings, redis, live_slots=catalog.live_slots)
        pipeline = JobPipeline(settings, redis, relay, queue, admission)
        chat_adapter = ChatAdapter(settings, pipeline, catalog)
        completions = CompletionAdapter(settings, pipeline, catalog)
        responses_adapter = ResponsesAdapter(settings, pipeline, catalog)
        files = FileStore(redis, Path(settings.files_dir), settings.upload_max_bytes)
        runner = BatchRunner(settings, redis, files, chat_adapter, pipeline, completions, responses_adapter)
        # The batch runners wake when a batch's line ends (announced by the job core), told
        # by the relay's connection: one pub/sub connection per API process, not two.
        relay.listen(keys.BATCH_PROGRESS, runner.wake)
        await relay.start()
        app.state.settings = settings
        app.state.redis = redis
        app.state.relay = relay
        app.state.catalog = catalog
        app.state.pipeline = pipeline
        app.state.chat = chat_adapter
        app.state.completions = completions
        app.state.responses = responses_adapter
        app.state.files = files
        app.state.batches = BatchService(redis, files, runner)
        reaper = Reaper(pipeline.store, queue.submit, settings)
        background = [
            asyncio.create_task(reaper.run(), name="reaper"),
            asyncio.create_task(catalog.keep_warm(), name="tokenizer-warm-up"),
            asyncio.create_task(runner.supervise(), name="batch-supervisor"),
        ]
        # The imports and app objects live as long as the process: out of the collector's
        # sight, so a full collection does not stall every stream for 200 ms.
        freeze_startup_heap("api")
        try:
            yield
        finally:
            await cancel_and_wait(background)
            await runner.stop()
            await relay.stop()
            await queue.aclose()
            await catalog.aclose()
            await redis.aclose()
            forget_dead_processes(include_self=True)

    app = FastAPI(title="llmq: queue-based LLM inference", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    # Hostile input: header and body size, JSON depth, UTF-8 (api/limits.py); 431/413/400.
    install_limits(app, settings)
    # API keys on every route but GET /health and /v1/health (read once, at start-up).
    keyring = KeyRing.from_settings(settings)
    if keyring.open:
        logging.getLogger(__name__).warning("no API_KEYS configured: the API is open to anyone who can reach it")
    # (Metrics, issue 9: /metrics and /metrics/targets are public too unless METRICS_REQUIRE_KEY.)
    public_paths = PUBLIC_PATHS if settings.metrics_require_key else PUBLIC_PATHS | METRICS_PATHS
    app.add_middleware(AuthMiddleware, ring=keyring, public_paths=public_paths)
    # Logs (issue 9): one `request` line per request; outside AuthMiddleware, so it sees
    # the caller's key id (and the 401s). api/request_log.py.
    app.add_middleware(RequestLogMiddleware)
    # Metrics (issue 9): requests, rejections (the 401s and 413/431s too) and open streams,
    # counted outside every other middleware but CORS. api/metrics.py.
    app.add_middleware(MetricsMiddleware)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(responses.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(file_routes.router)
    app.include_router(batch_routes.router)
    app.include_router(metrics_router)  # GET /metrics, /metrics/targets (issue 9)
    # CORS (issue 8), only for the configured origins (none: no CORS headers at all). Added
    # last, so it is the outermost middleware: it answers preflights (OPTIONS, which never
    # carry an API key) before anything that checks keys. Request headers are mirrored
    # (Authorization, Content-Type, Last-Event-ID, the official JS client's X-Stainless-*);
    # no cookies, so no credentials mode.
    if settings.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allowed_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            # Response headers page scripts may read.
            expose_headers=[
                "X-Request-Id",
                "Retry-After",
                *(f"x-ratelimit-{w}-{u}" for w in ("limit", "remaining", "reset") for u in ("requests", "tokens")),
            ],
            max_age=600,
        )
    # The OpenAPI document: 400s instead of 422s, the bearer API key, 401 on every protected operation.
    customize_openapi(app, settings)
    return app


# Logs (issue 9): text or JSON lines (LOG_FORMAT, LOG_LEVEL), uvicorn's included (common/logs.py).
setup_logging(get_settings(), "api")
app = create_app()
