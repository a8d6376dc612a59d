"""FastAPI dependencies, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.catalog import ModelCatalog
from api.chat import ChatService
from common.settings import Settings


def _chat_service(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


ChatServiceDep = Annotated[ChatService, Depends(_chat_service)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
SettingsDep = Annotated[Settings, Depends(_settings)]
