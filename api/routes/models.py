"""`GET /v1/models`: the models that have a live worker."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CatalogDep
from api.openapi import error_responses
from common.errors import ModelNotFoundError
from common.schemas import Model, ModelList

router = APIRouter()


@router.get("/v1/models", responses=error_responses(503))
async def list_models(catalog: CatalogDep) -> ModelList:
    models = await catalog.live_models(fresh=True)
    return ModelList(data=[Model(id=c.name, created=c.created, max_model_len=c.max_model_len) for c in models.values()])


@router.get("/v1/models/{model_id:path}", responses=error_responses(404, 503, e404="No live worker serves this model."))
async def retrieve_model(model_id: str, catalog: CatalogDep) -> Model:
    card = (await catalog.live_models(fresh=True)).get(model_id)
    if card is None:
        raise ModelNotFoundError(f"The model '{model_id}' does not exist or has no live worker.", param="model")
    return Model(id=card.name, created=card.created, max_model_len=card.max_model_len)
