"""Dependencies the routers share; the lifespan puts the objects on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from engine.embedded.async_engine import AsyncEngine
from engine.embedded.metrics import EngineMetrics
from engine.embedded.serving import OpenAIServing


def get_serving(request: Request) -> OpenAIServing:
    return request.app.state.serving  # type: ignore[no-any-return]


def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine  # type: ignore[no-any-return]


def get_metrics(request: Request) -> EngineMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


ServingDep = Annotated[OpenAIServing, Depends(get_serving)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
MetricsDep = Annotated[EngineMetrics, Depends(get_metrics)]
