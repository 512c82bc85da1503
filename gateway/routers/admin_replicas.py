"""Admin API, replicas (admin scope; registering and deregistering also take an ``engine`` key,
which can do nothing else):

- ``GET /admin/replicas``: every replica (static ones from ``TUNEGATE_GATEWAY_ENGINES`` and
  registered ones) with health, load and adapters held; registered ones add ``kind``,
  ``registered_at`` and ``last_seen`` (unix seconds).
- ``POST /admin/replicas`` ``{"url": "http://host:port", "kind": "vllm"}``: register an engine
  (idempotent: 201 when new, 200 when it only refreshes ``last_seen``). Every gateway process
  on the same database picks it up within one health interval; this one at once.
- ``DELETE /admin/replicas?url=...``: deregister one (404 when not registered; 409 for a static
  one, which only the settings can remove). Requests in flight on it finish.
- ``POST /admin/replicas/check``: run a health check round now.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from gateway.deps import State, admin_key, replica_key
from shared.errors import Conflict, NotFound
from shared.replicas import replica_url

router = APIRouter(prefix="/admin/replicas", tags=["admin"])
_admin = [Depends(admin_key)]
_replica = [Depends(replica_key)]


class ReplicaRegister(BaseModel):
    url: str = Field(min_length=1, max_length=500)
    # How the engine was started ("vllm", "embedded", ...); informational only: the gateway
    # drives every kind alike.
    kind: str | None = Field(default=None, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")


async def _listing(state: State) -> dict[str, Any]:
    records = {r.url: r for r in await to_thread.run_sync(state.replicas.records)}
    data = []
    for r in state.router.replicas:
        item = r.status()
        rec = records.get(r.url)
        if rec is not None:
            item.update({k: v for k, v in rec.public().items() if k != "url"})
        data.append(item)
    return {"object": "list", "data": data}


@router.get("", dependencies=_admin)
async def list_replicas(state: State) -> dict[str, Any]:
    return await _listing(state)


@router.post("", status_code=201, dependencies=_replica)
async def register_replica(body: ReplicaRegister, state: State,
                           response: Response) -> dict[str, Any]:
    url = replica_url(body.url)
    record, created = await to_thread.run_sync(state.replicas.register, url, body.kind)
    if not created:
        response.status_code = 200
    # This process routes to it at once; the others on their next health round. Every replica
    # never checked yet is checked now: not only those this call added, since the background
    # health round may have added this one a moment ago, its check still in flight.
    await state.router.sync_registered()
    await asyncio.gather(*(state.router.check(r) for r in state.router.replicas
                           if not r.last_check))
    replica = next((r for r in state.router.replicas if r.url == url), None)
    status = replica.status() if replica is not None else {}
    return {**status, **record.public()}


@router.delete("", dependencies=_replica)
async def deregister_replica(url: Annotated[str, Query(min_length=1, max_length=500)],
                             state: State) -> dict[str, Any]:
    url = replica_url(url)
    if url in {r.url for r in state.router.replicas if r.static}:
        raise Conflict(f"{url} is a static replica (TUNEGATE_GATEWAY_ENGINES); remove it from "
                       "the gateway's settings instead.", param="url", code="static_replica")
    if not await to_thread.run_sync(state.replicas.deregister, url):
        raise NotFound(f"No registered replica {url}.", param="url", code="replica_not_found")
    await state.router.sync_registered()
    return {"url": url, "object": "replica", "deleted": True}


@router.post("/check", dependencies=_admin)
async def check_replicas(state: State) -> dict[str, Any]:
    await state.router.check_all()
    return await _listing(state)
