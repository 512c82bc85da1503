"""Admin API, keys: ``/admin/keys`` (list, create: the secret is in the answer once), detail,
``PATCH`` (``{"sample_rate": 0..1 | null}``: the key's traffic sampling override, 0 opts out, null
goes back to the gateway's default) and ``DELETE`` (revoke). Admin scope only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gateway.deps import State, admin_key

router = APIRouter(prefix="/admin/keys", tags=["admin"], dependencies=[Depends(admin_key)])


# Limits are counted in Redis (Lua numbers are doubles: exact to 2**53) and stored in a 64-bit
# column; 10**12 per minute is more than any key needs.
MAX_LIMIT = 10**12
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    scope: Literal["user", "admin", "engine"] = "user"
    models: list[ModelName] | None = Field(default=None, max_length=1000)  # None: every model
    rpm: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    tpm: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    sample_rate: float | None = Field(default=None, ge=0, le=1)  # None: the gateway's default
    may_label: bool | None = None  # feedback becomes training data; None: admin keys only


class KeyUpdate(BaseModel):
    sample_rate: float | None = Field(ge=0, le=1)  # required; null clears the override


@router.get("")
def list_keys(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [k.public() for k in state.keys.list()]}


@router.post("", status_code=201)
def create_key(body: KeyCreate, state: State) -> dict[str, Any]:
    secret, info = state.keys.create(name=body.name, scope=body.scope, models=body.models,
                                     rpm=body.rpm, tpm=body.tpm,
                                     sample_rate=body.sample_rate, may_label=body.may_label)
    return {**info.public(), "key": secret}


@router.get("/{key_id}")
def get_key(key_id: str, state: State) -> dict[str, Any]:
    return state.keys.get(key_id).public()


@router.patch("/{key_id}")
def update_key(key_id: str, body: KeyUpdate, state: State) -> dict[str, Any]:
    return state.keys.set_sample_rate(key_id, body.sample_rate).public()


@router.delete("/{key_id}")
def revoke_key(key_id: str, state: State) -> dict[str, Any]:
    return state.keys.revoke(key_id).public()
