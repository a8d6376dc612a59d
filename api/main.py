"""The API app: `uvicorn api.main:app`. Builds the shared Redis client, the stream relay,
the model catalog and the job queue once per process, in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI

from api.batches import BatchService
from api.catalog import ModelCatalog
from api.chat import ChatService
from api.errors import install_error_handlers
from api.files import FileStore
from api.relay import StreamRelay
from api.routes import batches as batch_routes
from api.routes import chat, health, models
from api.routes import files as file_routes
from common.job_queue import JobQueue
from common.reaper import Reaper
from common.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.from_url(settings.redis_url, health_check_interval=10)
        relay = StreamRelay(settings.redis_url, settings.stream_buffer_events)
        await relay.start()
        catalog = ModelCatalog(redis, settings.worker_ttl_seconds)
        queue = JobQueue(settings.redis_url, settings.broker_visibility_timeout)
        app.state.settings = settings
        app.state.redis = redis
        app.state.relay = relay
        app.state.catalog = catalog
        chat = ChatService(settings, redis, relay, catalog, queue)
        app.state.chat = chat
        reaper = Reaper(
            chat.store,
            queue.submit,
            worker_ttl_seconds=settings.worker_ttl_seconds,
            max_attempts=settings.max_attempts,
            interval_seconds=settings.reaper_interval_seconds,
        )
        files = FileStore(redis, Path(settings.files_dir), settings.upload_max_bytes)
        batches = BatchService(settings, redis, files, chat, queue)
        app.state.files = files
        app.state.batches = batches
        background = [
            asyncio.create_task(reaper.run(), name="reaper"),
            asyncio.create_task(catalog.keep_warm(), name="tokenizer-warm-up"),
            asyncio.create_task(batches.supervise(), name="batch-supervisor"),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await batches.stop()
            await relay.stop()
            queue.close()
            catalog.close()
            await redis.aclose()

    app = FastAPI(title="llmq: queue-based LLM inference", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(file_routes.router)
    app.include_router(batch_routes.router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
