"""Admin API, replicas (admin scope): ``GET /admin/replicas`` (health, load, adapters held) and
``POST /admin/replicas/check`` (run a health check round now)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from gateway.deps import State, admin_key

router = APIRouter(prefix="/admin/replicas", tags=["admin"], dependencies=[Depends(admin_key)])


@router.get("")
async def list_replicas(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [r.status() for r in state.router.replicas]}


@router.post("/check")
async def check_replicas(state: State) -> dict[str, Any]:
    await state.router.check_all()
    return {"object": "list", "data": [r.status() for r in state.router.replicas]}
