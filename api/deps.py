"""FastAPI dependencies, as `Annotated` aliases.

Every one is `async def`: FastAPI runs a plain `def` dependency in its thread pool, a
thread hand-off per dependency per request (two on every create) that cost about 7% of the
API's CPU under load (issue 12; tests/unit/test_openapi.py checks none is sync)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import Principal, principal_of
from api.batches.service import BatchService
from api.catalog import ModelCatalog
from api.endpoints.chat import ChatAdapter
from api.endpoints.completions import CompletionAdapter
from api.endpoints.responses import ResponsesAdapter
from common.settings import Settings


async def _chat(request: Request) -> ChatAdapter:
    return request.app.state.chat  # type: ignore[no-any-return]


async def _completions(request: Request) -> CompletionAdapter:
    return request.app.state.completions  # type: ignore[no-any-return]


async def _responses(request: Request) -> ResponsesAdapter:
    return request.app.state.responses  # type: ignore[no-any-return]


async def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog  # type: ignore[no-any-return]


async def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _batches(request: Request) -> BatchService:
    return request.app.state.batches  # type: ignore[no-any-return]


async def _principal(request: Request) -> Principal:
    return principal_of(request)


ChatDep = Annotated[ChatAdapter, Depends(_chat)]
CompletionsDep = Annotated[CompletionAdapter, Depends(_completions)]
ResponsesDep = Annotated[ResponsesAdapter, Depends(_responses)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
SettingsDep = Annotated[Settings, Depends(_settings)]
BatchesDep = Annotated[BatchService, Depends(_batches)]
# The caller, as the auth middleware identified it.
PrincipalDep = Annotated[Principal, Depends(_principal)]
