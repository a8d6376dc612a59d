"""`GET /health` (also `GET /v1/health`): 200 when Redis answers, 503 otherwise; lists the live models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import CatalogDep
from api.openapi import HealthStatus, HealthUnavailable

router = APIRouter()

HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"model": HealthStatus, "description": "Redis answers."},
    503: {"model": HealthUnavailable, "description": "Redis does not answer."},
}


@router.get("/health", responses=HEALTH)
@router.get("/v1/health", responses=HEALTH)
async def health(request: Request, catalog: CatalogDep) -> JSONResponse:
    try:
        await request.app.state.redis.ping()
        models = sorted(await catalog.live_models(fresh=True))
    except (RedisError, OSError) as exc:
        return JSONResponse(status_code=503, content={"status": "unavailable", "redis": f"error: {exc}"})
    return JSONResponse(
        content={
            "status": "ok",
            "redis": "ok",
            "models": models,
            "open_streams": request.app.state.relay.open_streams,
            # Models whose requests can be validated right now (tokenizer loaded).
            "ready_models": sorted(request.app.state.catalog.ready_models(models)),
        }
    )
