"""The console's routes.

- ``GET /console``: the page (no secrets in it; it shows the sign-in until a session exists);
  ``GET /console/static/{file}``: its script, style sheet and icon, from this package only.
- ``POST /console/session``: sign in with ``Authorization: Bearer <admin key>`` (no body is
  read): sets the session cookie (HttpOnly, SameSite=Strict, Path=/) and answers the CSRF token;
  a user key gets 403. ``GET /console/session``: who is signed in, and the CSRF token.
  ``DELETE /console/session``: sign out (CSRF checked).
- ``GET /console/api/overview``: replicas, sampled traffic of the last hour in 5-minute buckets
  (requests, errors, latency and TTFT p95), quota refusals since the process started, running
  jobs, active promotions.
- Sampled traffic (``gateway.console.traffic``) and each adapter's quality runs
  (``GET /console/api/quality/{name}``).

Everything under ``/console/api`` and every admin API accepts the session cookie in place of a
Bearer key (``gateway.deps.current_key``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select

from gateway.auth import admin_only, bearer_secret, hash_key, unknown_key
from gateway.console import traffic
from gateway.console_sessions import COOKIE, SessionStore
from gateway.deps import AdminKey, State, admin_key, console_session
from shared.db import utcnow
from shared.errors import NotFound
from shared.promotion import EvalRun

STATIC = Path(__file__).parent / "static"
FILES = {"app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
# The page loads nothing from elsewhere; inline scripts and styles are refused too.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["console"])
api = APIRouter(prefix="/console/api", tags=["console"], dependencies=[Depends(admin_key)])


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI, state: Any) -> AsyncIterator[None]:
    app.state.console_sessions = SessionStore(state.db, state.settings.console_session_ttl_s)
    yield


@router.get("/console", include_in_schema=False)  # the page, not an API
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/console/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    if name not in FILES:
        raise NotFound(f"no console file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


def _session_body(key: Any, csrf: str) -> dict[str, Any]:
    return {"key": key.public(), "csrf": csrf}


@router.post("/console/session")
async def sign_in(request: Request, state: State) -> JSONResponse:
    # Authenticated from the header alone, before anything else of the request is read.
    digest = hash_key(bearer_secret(request.headers.get("authorization")))
    info = await state.keys.authenticate(digest)
    if info is None:
        raise unknown_key()
    admin_only(info)
    sessions: SessionStore = request.app.state.console_sessions
    token, session = await to_thread.run_sync(sessions.create, info.id, digest)
    resp = JSONResponse(_session_body(info, session.csrf), headers={"Cache-Control": "no-store"})
    resp.set_cookie(
        COOKIE,
        token,
        max_age=int(sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


@router.get("/console/session")
async def who(request: Request, key: AdminKey) -> dict[str, Any]:
    session = await console_session(request)
    if session is None:  # a Bearer caller: nothing to sign out of
        raise NotFound("no console session", code="no_session")
    return _session_body(key, session.csrf)


@router.delete("/console/session")
async def sign_out(request: Request, key: AdminKey) -> Response:
    sessions: SessionStore = request.app.state.console_sessions
    token = request.cookies.get(COOKIE)
    if token:
        await to_thread.run_sync(sessions.end, token)
    resp = Response(status_code=204)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return resp


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def _overview(state: Any) -> dict[str, Any]:
    from shared.job_records import JobStore
    from shared.promotion import Promotions

    since = utcnow() - dt.timedelta(hours=1)
    rows = traffic.recent(state.db, since)
    buckets: list[dict[str, Any]] = []
    for i in range(12):  # 5-minute buckets, oldest first
        lo, hi = since + dt.timedelta(minutes=5 * i), since + dt.timedelta(minutes=5 * (i + 1))
        sel = [r for r in rows if lo <= r[0] < hi]
        buckets.append(
            {
                "start": lo.isoformat(),
                "requests": len(sel),
                "errors": sum(1 for r in sel if r[1] >= 400),
                "latency_p95_ms": _p95([r[2] for r in sel]),
                "ttft_p95_ms": _p95([r[3] for r in sel if r[3] is not None]),
            }
        )
    jobs = [
        j
        for j in JobStore(state.db).list_jobs(limit=50)
        if j["status"] in ("validating_files", "queued", "running")
    ]
    active = Promotions(state.db, state.registry).active()
    return {
        "traffic": buckets,
        "sampled_last_hour": len(rows),
        "errors_last_hour": sum(1 for r in rows if r[1] >= 400),
        "latency_p95_ms": _p95([r[2] for r in rows]),
        "ttft_p95_ms": _p95([r[3] for r in rows if r[3] is not None]),
        "jobs": [
            {"id": j["id"], "status": j["status"], "suffix": j["name"], "progress": j["progress"]}
            for j in jobs
        ],
        "promotions": active,
    }


def _counter_total(state: Any, name: str) -> float:
    total = 0.0
    for metric in state.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


@api.get("/overview")
async def overview(state: State) -> dict[str, Any]:
    out = await to_thread.run_sync(_overview, state)
    out["quota_refusals"] = _counter_total(state, "tunegate_quota_rejections_total")
    out["requests_total"] = _counter_total(state, "tunegate_requests_total")
    return out


def _quality(state: Any, name: str) -> list[dict[str, Any]]:
    with state.db.session() as s:
        rows = s.scalars(
            select(EvalRun).where(EvalRun.name == name).order_by(EvalRun.id.desc()).limit(500)
        ).all()
        return [
            {
                "version": r.version,
                "kind": r.kind,
                "n": r.n,
                "score": r.score,
                "lanes": (r.metrics or {}).get("lanes"),
                "at": r.created_at.isoformat(),
            }
            for r in reversed(rows)
        ]


@api.get("/quality/{name}")
async def quality(name: str, state: State) -> dict[str, Any]:
    return {"object": "list", "data": await to_thread.run_sync(_quality, state, name)}


def _usage(state: Any) -> dict[str, int]:
    from sqlalchemy import func

    from shared.traffic_records import TrafficSample

    since = utcnow() - dt.timedelta(days=1)
    with state.db.session() as s:
        return {
            k: n
            for k, n in s.execute(
                select(TrafficSample.key_id, func.count())
                .where(TrafficSample.created_at >= since, TrafficSample.lane != "shadow")
                .group_by(TrafficSample.key_id)
            )
            if k
        }


@api.get("/usage")
async def usage(state: State) -> dict[str, Any]:
    """Sampled requests per key over the last 24 hours."""
    return {"object": "usage", "data": await to_thread.run_sync(_usage, state)}


api.include_router(traffic.router)
router.include_router(api)
