"""``GET /health`` (the process is up), ``GET /ready`` (a replica is healthy), ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.deps import State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(state: State) -> Response:
    healthy = sum(r.healthy for r in state.router.replicas)
    return JSONResponse({"ready": healthy > 0, "healthy_replicas": healthy},
                        status_code=200 if healthy else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    for r in state.router.replicas:
        state.metrics.replica_in_flight.labels(r.url).set(r.in_flight)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
