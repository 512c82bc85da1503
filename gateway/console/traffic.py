"""Sampled traffic for the console (admin): list with filters, one sample, label or correct it
(feedback recorded as given by that admin key, ``feedback_key_id``), and export as a
training or golden JSONL file (``shared.traffic_datasets``: labelled samples, the label or
correction as the answer).

- ``GET /console/api/traffic`` ``?model=NAME|NAME@vN&lane=&labelled=yes|no&since=&until=&limit=``
- ``GET /console/api/traffic/{id}``
- ``POST /console/api/traffic/{id}/feedback`` ``{label?, score?, corrected_output?}``
- ``GET /console/api/traffic/export`` ``?model=&kind=training|golden&since=``
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Query, Response
from fastapi import Path as FastPath
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import or_, select, update

from gateway.deps import AdminKey, State
from shared.db import Database, utcnow
from shared.errors import InvalidRequest, NotFound
from shared.traffic_datasets import parse_model, traffic_data
from shared.traffic_records import LANES, TrafficSample

router = APIRouter(prefix="/traffic")
MAX_LIST = 200


def recent(db: Database, since: dt.datetime) -> list[tuple[dt.datetime, int, float, float | None]]:
    """``(created_at, status, latency_ms, ttft_ms)`` of the live samples since ``since``."""
    with db.session() as s:
        return [
            (r[0], r[1], r[2], r[3])
            for r in s.execute(
                select(
                    TrafficSample.created_at,
                    TrafficSample.status,
                    TrafficSample.latency_ms,
                    TrafficSample.ttft_ms,
                )
                .where(TrafficSample.created_at >= since, TrafficSample.lane != "shadow")
                .limit(100_000)
            )
        ]


def _row(r: TrafficSample, full: bool = False) -> dict[str, Any]:
    out = {
        "id": r.id,
        "request_id": r.request_id,
        "trace_id": r.trace_id,
        "model": r.model,
        "ref": r.ref,
        "lane": r.lane,
        "status": r.status,
        "latency_ms": r.latency_ms,
        "ttft_ms": r.ttft_ms,
        "created_at": r.created_at.isoformat(),
        "label": r.label,
        "score": r.score,
        "corrected_output": r.corrected_output,
        "feedback_by": r.feedback_key_id,
        "feedback_at": r.feedback_at.isoformat() if r.feedback_at else None,
        "prompt": _prompt(r.request),
        "output": r.output if full else r.output[:200],
    }
    if full:
        out["request"] = r.request
        out["key_id"] = r.key_id
    return out


def _prompt(request: dict[str, Any]) -> str:
    msgs = request.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
        return str(msgs[-1].get("content", ""))[:2000]
    for field in ("prompt", "input", "text"):
        if isinstance(request.get(field), str):
            return str(request[field])[:2000]
    return ""


@router.get("")
async def list_samples(
    state: State,
    model: str | None = Query(None, max_length=200),
    lane: Literal["stable", "canary", "shadow", "pinned", "base"] | None = None,
    labelled: Literal["yes", "no"] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = Query(50, ge=1, le=MAX_LIST),
) -> dict[str, Any]:
    q = select(TrafficSample)
    if model:
        name, version = parse_model(model)
        q = q.where(TrafficSample.name == name)
        if version is not None:
            q = q.where(TrafficSample.version == version)
    if lane is not None:
        q = q.where(TrafficSample.lane == lane)
    has = or_(TrafficSample.label.is_not(None), TrafficSample.corrected_output.is_not(None))
    if labelled == "yes":
        q = q.where(has)
    elif labelled == "no":
        q = q.where(~has)
    if since is not None:
        q = q.where(TrafficSample.created_at >= since)
    if until is not None:
        q = q.where(TrafficSample.created_at < until)

    def run() -> list[dict[str, Any]]:
        with state.db.session() as s:
            return [_row(r) for r in s.scalars(q.order_by(TrafficSample.id.desc()).limit(limit))]

    return {"object": "list", "data": await to_thread.run_sync(run), "lanes": list(LANES)}


@router.get("/export", response_class=Response, responses={200: {
    "description": "One JSON record a line", "content": {"application/jsonl": {}}}})
async def export(
    state: State,
    model: str = Query(min_length=1, max_length=200),
    kind: Literal["training", "golden"] = "training",
    since: dt.datetime | None = None,
) -> Response:
    start = since or (utcnow() - dt.timedelta(days=30))
    data = await to_thread.run_sync(lambda: traffic_data(state.db, model, start))
    body = "".join(line + "\n" for line in data.lines())
    name = f"{model.replace('@', '-')}-{kind}.jsonl"
    return Response(
        body,
        media_type="application/jsonl",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Tunegate-Records": str(len(data.records)),
        },
    )


# Row ids are 64-bit in SQL: a larger number is this request's 422, not a driver error.
SampleId = Annotated[int, FastPath(ge=1, le=2**63 - 1)]


async def _get(state: Any, sample_id: int) -> TrafficSample:
    def run() -> TrafficSample | None:
        with state.db.session() as s:
            return s.get(TrafficSample, sample_id)

    row = await to_thread.run_sync(run)
    if row is None:
        raise NotFound(f"no sampled request {sample_id}", param="id")
    return row


@router.get("/{sample_id}")
async def get_sample(sample_id: SampleId, state: State) -> dict[str, Any]:
    return _row(await _get(state, sample_id), full=True)


class AdminFeedback(BaseModel):
    label: str | None = Field(default=None, min_length=1, max_length=200)
    score: float | None = Field(default=None, ge=0, le=1)
    corrected_output: str | None = Field(default=None, min_length=1, max_length=32_768)

    @model_validator(mode="after")
    def _something(self) -> AdminFeedback:
        if self.label is None and self.score is None and self.corrected_output is None:
            raise ValueError("give at least one of label, score, corrected_output")
        return self


@router.post("/{sample_id}/feedback")
async def give_feedback(
    sample_id: SampleId, body: AdminFeedback, key: AdminKey, state: State
) -> dict[str, Any]:
    row = await _get(state, sample_id)
    if row.lane == "shadow":
        raise InvalidRequest(
            "a shadow answer is judged through its live request; label that one",
            param="id",
            code="shadow_sample",
        )
    values = {k: v for k, v in body.model_dump().items() if v is not None}

    def run() -> None:
        with state.db.session() as s:
            s.execute(
                update(TrafficSample)
                .where(TrafficSample.request_id == row.request_id, TrafficSample.lane != "shadow")
                .values(**values, feedback_at=utcnow(), feedback_key_id=key.id,
                        feedback_trusted=key.can_label)
            )

    await to_thread.run_sync(run)
    return _row(await _get(state, sample_id), full=True)
