"""``GET /health`` (the process is up), ``GET /ready`` (a replica is healthy), ``GET /metrics``
(open, admin keys only, or off: ``metrics_access``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import admin_only
from gateway.deps import State, current_key
from shared.errors import NotFound

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(state: State) -> Response:
    healthy = sum(r.healthy for r in state.router.replicas)
    return JSONResponse({"ready": healthy > 0, "healthy_replicas": healthy},
                        status_code=200 if healthy else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State, request: Request) -> Response:
    access = state.settings.metrics_access
    if access == "off":
        raise NotFound("Not Found")
    if access == "admin":
        admin_only(await current_key(request))
    for r in state.router.replicas:
        state.metrics.replica_in_flight.labels(r.url).set(r.in_flight)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
