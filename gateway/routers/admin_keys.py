"""Admin API, keys: ``/admin/keys`` (list, create: the secret is in the answer once), detail and
``DELETE`` (revoke). Admin scope only."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gateway.deps import State, admin_key

router = APIRouter(prefix="/admin/keys", tags=["admin"], dependencies=[Depends(admin_key)])


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    scope: Literal["user", "admin"] = "user"
    models: list[str] | None = None  # None: every model
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


@router.get("")
def list_keys(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [k.public() for k in state.keys.list()]}


@router.post("", status_code=201)
def create_key(body: KeyCreate, state: State) -> dict[str, Any]:
    secret, info = state.keys.create(name=body.name, scope=body.scope, models=body.models,
                                     rpm=body.rpm, tpm=body.tpm)
    return {**info.public(), "key": secret}


@router.get("/{key_id}")
def get_key(key_id: str, state: State) -> dict[str, Any]:
    return state.keys.get(key_id).public()


@router.delete("/{key_id}")
def revoke_key(key_id: str, state: State) -> dict[str, Any]:
    return state.keys.revoke(key_id).public()
