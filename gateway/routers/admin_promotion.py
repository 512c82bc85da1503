"""Admin API, promotions (admin scope):

- ``GET /admin/promotions``: the active promotions (``waiting``: what one that lacks traffic
  for its gate waits for, set by the monitor; also the ``tunegate_promotion_waiting`` gauge)
- ``POST /admin/promotions`` ``{version: "NAME@vN", shadow_fraction?, canary_weight?, reason?}``:
  start a promotion (state ``candidate``; 409 when the name has an active one or no ``stable``)
- ``GET /admin/promotions/{name}``: the current (or last) promotion, its events and the latest
  evaluation runs of its version
- ``POST /admin/promotions/{name}/promote`` ``{reason?, to?}``: one step forward, or up to the
  state ``to`` (by hand: the automatic gates are skipped; the event says who did it)
- ``POST /admin/promotions/{name}/rollback`` ``{reason?}``: reject the candidate, or roll back
  its canary, or (after it reached ``stable``) move ``stable`` back to the previous version

This module's lifespan also installs the request path's routing (``gateway.promotion``) and the
``tunegate_quality_score{model, version}`` gauge: the latest ``quality`` evaluation run of every
version evaluated within ``quality_max_age_s``, read from SQL every ``quality_refresh_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI
from prometheus_client import Gauge
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from gateway.deps import AdminKey, State, admin_key
from gateway.promotion import PromotionRouting
from shared.db import Database, utcnow
from shared.errors import Conflict
from shared.promotion import NEXT, EvalRun, Promotions, PromotionSettings, parse_ref

log = logging.getLogger("tunegate.gateway.promotion")
router = APIRouter(prefix="/admin/promotions", tags=["admin"], dependencies=[Depends(admin_key)])


class PromotionCreate(BaseModel):
    version: str = Field(min_length=3, max_length=80)  # NAME@vN
    shadow_fraction: float | None = Field(default=None, ge=0, le=1)
    canary_weight: float | None = Field(default=None, ge=0, le=1)
    reason: str = Field(default="started by an operator", max_length=400)


class Step(BaseModel):
    reason: str = Field(default="by an operator", max_length=400)
    to: Literal["shadow", "canary", "stable"] | None = None


def latest_quality(db: Database, max_age_s: float) -> list[tuple[str, int, float]]:
    """``(name, version, score)`` of the newest ``quality`` run per version, recent ones only."""
    since = utcnow() - dt.timedelta(seconds=max_age_s)
    with db.session() as s:
        newest = (select(func.max(EvalRun.id)).where(EvalRun.kind == "quality",
                                                     EvalRun.created_at >= since)
                  .group_by(EvalRun.name, EvalRun.version))
        rows = s.scalars(select(EvalRun).where(EvalRun.id.in_(newest))).all()
        return [(r.name, r.version, r.score) for r in rows if r.score is not None]


def eval_runs(db: Database, name: str, version: int, limit: int = 20) -> list[dict[str, Any]]:
    """The version's evaluation runs, newest first: the latest ``limit`` of each kind. Per kind,
    because the quality monitor writes a run every few seconds while a version serves, and a
    single newest-first window would push the promotion's shadow evaluation (its gate evidence)
    out of view during a long canary."""
    of_version = (EvalRun.name == name, EvalRun.version == version)
    with db.session() as s:
        kinds = s.scalars(select(EvalRun.kind).where(*of_version).distinct()).all()
        rows = sorted((r for kind in kinds for r in s.scalars(
            select(EvalRun).where(*of_version, EvalRun.kind == kind)
            .order_by(EvalRun.id.desc()).limit(limit))), key=lambda r: r.id, reverse=True)
        return [{"id": r.id, "kind": r.kind, "n": r.n, "score": r.score, "metrics": r.metrics,
                 "created_at": r.created_at.isoformat()} for r in rows]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI, state: Any) -> AsyncIterator[None]:
    settings = state.settings
    promotions = Promotions(state.db, state.registry, PromotionSettings())
    routing = PromotionRouting(promotions, state.redis, state.metrics.registry,
                               refresh_s=settings.cache_ttl_s,
                               max_shadow=settings.max_shadow_in_flight)
    gauge = Gauge("tunegate_quality_score",
                  "Latest rule-based quality score of sampled traffic per adapter version (0..1)",
                  ["model", "version"], registry=state.metrics.registry)
    # What the quality score is held against (the promotion gate's absolute floor), and the state
    # of each active promotion (1 for its current state), for dashboards and alerts.
    threshold = Gauge("tunegate_quality_threshold",
                      "The promotion gate's minimum quality score (0..1)",
                      registry=state.metrics.registry)
    threshold.set(promotions.settings.min_quality)
    states = Gauge("tunegate_promotion_state",
                   "Active promotions: 1 for the candidate version's current state",
                   ["model", "version", "state"], registry=state.metrics.registry)
    waiting = Gauge("tunegate_promotion_waiting",
                    "1 while an active promotion holds for lack of traffic for its gate "
                    "(PromotionSettings.starved_after_s); promote or roll back by hand",
                    ["model", "version", "state"], registry=state.metrics.registry)
    app.state.promotions = promotions

    async def export_quality() -> None:
        while True:
            try:
                rows = await to_thread.run_sync(latest_quality, state.db,
                                                settings.quality_max_age_s)
                gauge.clear()
                for name, version, score in rows:
                    gauge.labels(name, f"v{version}").set(score)
                active = await to_thread.run_sync(promotions.active)
                states.clear()
                for p in active:
                    states.labels(p["name"], f"v{p['version']}", p["state"]).set(1)
                waiting.clear()
                for p in active:
                    if p["waiting"]:
                        waiting.labels(p["name"], f"v{p['version']}", p["state"]).set(1)
            except Exception:  # keep exporting on the next round
                log.exception("reading quality scores failed")
            await asyncio.sleep(settings.quality_refresh_s)

    await routing.start()
    state.promotions = routing
    task = asyncio.create_task(export_quality(), name="quality-gauge")
    try:
        yield
    finally:
        state.promotions = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await routing.stop()


def _promotions(state: Any) -> Promotions:
    return state.promotions.promotions  # type: ignore[no-any-return]


async def _changed(state: Any) -> None:
    state.resolver.invalidate()
    await state.promotions.refresh()


@router.get("")
def list_active(state: State) -> dict[str, Any]:
    return {"object": "list", "data": _promotions(state).active()}


@router.post("", status_code=201)
async def start(body: PromotionCreate, key: AdminKey, state: State) -> dict[str, Any]:
    name, version = parse_ref(body.version)
    row = await to_thread.run_sync(lambda: _promotions(state).start(
        name, version, actor=f"key:{key.id}", reason=body.reason,
        shadow_fraction=body.shadow_fraction, canary_weight=body.canary_weight))
    await _changed(state)
    return row


@router.get("/{name}")
def get(name: str, state: State) -> dict[str, Any]:
    p = _promotions(state).get(name)
    return {**p, "evals": eval_runs(state.db, name, p["version"])}


@router.post("/{name}/promote")
async def promote(name: str, key: AdminKey, state: State,
                  body: Step | None = None) -> dict[str, Any]:
    body = body or Step()
    promotions = _promotions(state)

    def run() -> dict[str, Any]:
        order = ["candidate", *NEXT.values()]
        cur = promotions.current(name)
        if body.to is not None and cur is not None and cur["state"] in order and \
                order.index(cur["state"]) >= order.index(body.to):
            raise Conflict(f"{cur['ref']} is {cur['state']}, not before {body.to}",
                           code="invalid_transition")
        row = promotions.advance(name, actor=f"key:{key.id}", reason=body.reason)
        left = row["from_state"]  # the state it really left, not the last hop's
        while body.to is not None and row["state"] != body.to and row["state"] in NEXT:
            row = promotions.advance(name, actor=f"key:{key.id}", reason=body.reason)
        return {**row, "from_state": left}

    row = await to_thread.run_sync(run)
    await _changed(state)
    return row


@router.post("/{name}/rollback")
async def rollback(name: str, key: AdminKey, state: State,
                   body: Step | None = None) -> dict[str, Any]:
    reason = body.reason if body else "by an operator"
    row = await to_thread.run_sync(lambda: _promotions(state).stop(
        name, actor=f"key:{key.id}", reason=reason))
    await _changed(state)
    return row
