"""Admin API, adapters and aliases (admin scope):

- ``GET /admin/adapters``; ``GET /admin/adapters/{name}`` (versions, aliases)
- ``POST /admin/adapters/{name}/versions`` ``{path, manifest}``: register the folder ``path``
  *inside the artifact store* (relative; absolute paths, ``..`` and URLs are refused with 400)
- ``GET /admin/adapters/{name}/versions/{version}``
- ``GET /admin/adapters/{name}/aliases`` (current and history)
- ``PUT /admin/adapters/{name}/aliases/{alias}`` ``{version, reason?}``
- ``POST /admin/adapters/{name}/aliases/{alias}/rollback`` ``{reason?}``
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gateway.deps import State, admin_key
from shared.errors import NotFound
from shared.registry import parse_model_name

router = APIRouter(prefix="/admin/adapters", tags=["admin"], dependencies=[Depends(admin_key)])


class VersionCreate(BaseModel):
    path: str = Field(min_length=1, max_length=500)
    manifest: dict[str, Any] = Field(default_factory=dict)


class AliasSet(BaseModel):
    version: int | str  # 3, "v3" or "NAME@v3"
    reason: str | None = Field(default=None, max_length=500)


class RollbackBody(BaseModel):
    reason: str | None = Field(default=None, max_length=500)


def _version_number(name: str, v: int | str) -> int:
    if isinstance(v, int):
        return v
    ref = v if "@" in v else f"{name}@{v}"
    try:
        n, _, number = parse_model_name(ref)
    except Exception:
        number, n = None, name
    if number is None or n != name:
        raise NotFound(f"no version {v!r} of {name!r}", param="version")
    return number


@router.get("")
def list_adapters(state: State) -> dict[str, Any]:
    return {"object": "list", "data": state.registry.list_adapters()}


@router.get("/{name}")
def get_adapter(name: str, state: State) -> dict[str, Any]:
    return state.registry.get_adapter(name)


@router.post("/{name}/versions", status_code=201)
def register_version(name: str, body: VersionCreate, state: State) -> dict[str, Any]:
    info = state.registry.register_version(name, body.path, body.manifest)
    state.resolver.invalidate()
    return info.to_dict()


@router.get("/{name}/versions/{version}")
def get_version(name: str, version: str, state: State) -> dict[str, Any]:
    return state.registry.get_version(name, _version_number(name, version)).to_dict()


@router.get("/{name}/aliases")
def aliases(name: str, state: State) -> dict[str, Any]:
    current = state.registry.get_adapter(name)["aliases"]
    return {"name": name, "aliases": current, "history": state.registry.alias_history(name)}


@router.put("/{name}/aliases/{alias}")
def set_alias(name: str, alias: str, body: AliasSet, state: State) -> dict[str, Any]:
    version = _version_number(name, body.version)
    state.registry.set_alias(name, alias, version, reason=body.reason)
    state.resolver.invalidate()
    return {"name": name, "alias": alias, "version": version}


@router.post("/{name}/aliases/{alias}/rollback")
def rollback(name: str, alias: str, state: State,
             body: RollbackBody | None = None) -> dict[str, Any]:
    version = state.registry.rollback(name, alias, reason=body.reason if body else None)
    state.resolver.invalidate()
    return {"name": name, "alias": alias, "version": version}
