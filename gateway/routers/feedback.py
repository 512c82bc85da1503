"""``POST /v1/feedback``: a client labels one of its own sampled requests.

Body ``{request_id, label?, score?, corrected_output?}`` with at least one of the three: ``label``
(1..200 characters, e.g. the right class), ``score`` (0..1, e.g. 1 = good answer, 0 = bad) and
``corrected_output`` (the answer that should have been given). ``request_id`` is the id the
gateway made for the request (its ``x-tunegate-request-id`` response header; a client's own
``X-Request-ID`` is not accepted here, so it cannot be aimed at another key's request); requests
answered with ``x-tunegate-sampled: 1`` are the ones that can be labelled. Feedback given again
for the same request overwrites the fields it names. Every label records the key that gave it;
only labels of keys that may label (``may_label``, admin keys by default) become training data.

Answers:

- 200 ``{"object": "feedback", "status": "recorded", ...}``: the sample is in SQL and is labelled.
- 202 ``status: "pending"``: the sample is still on its way (on the Redis stream, waiting for the
  worker, which ingests every second); the feedback waits in Redis (a day) and the worker applies
  it when it stores the sample.
- 404 when this key made no sampled request with that id: not sampled, unknown, made by another
  key (the same answer, so that request ids of other keys cannot be probed), or sampled more than
  an hour ago and never ingested (the worker was down and the stream dropped it). An unknown id
  is looked up again for a moment first: feedback may arrive before the gateway's background
  writer has queued the sample.
- 400 for an invalid body; 503 when the sample is not in SQL and Redis cannot be asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.deps import Key, State
from shared.db import Database
from shared.errors import NotFound, Overloaded
from shared.traffic_records import (
    FEEDBACK_FIELDS,
    PENDING_FEEDBACK_TTL_S,
    REQUEST_ID_MAX_LEN,
    TRUSTED_FIELD,
    apply_feedback,
    owner_key,
    pending_feedback_key,
)

router = APIRouter(tags=["feedback"])


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=REQUEST_ID_MAX_LEN)
    label: str | None = Field(default=None, min_length=1, max_length=200)
    score: float | None = Field(default=None, ge=0, le=1)
    corrected_output: str | None = Field(default=None, min_length=1, max_length=32_768)

    @model_validator(mode="after")
    def _something(self) -> Feedback:
        if self.label is None and self.score is None and self.corrected_output is None:
            raise ValueError("give at least one of label, score, corrected_output")
        return self

    def fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FEEDBACK_FIELDS if getattr(self, k) is not None}


def _apply(db: Database, request_id: str, key_id: str, fields: dict[str, Any],
           trusted: bool) -> int:
    with db.session() as s:
        return apply_feedback(s, request_id, key_id, fields, trusted=trusted)


def _answer(body: Feedback, status: str) -> dict[str, Any]:
    return {"object": "feedback", "request_id": body.request_id, "status": status,
            **body.fields()}


async def _owner(redis: Any, name: str, wait_s: float) -> bytes | None:
    """The key id that made a sampled request. A client may send feedback the moment its answer
    arrives, before the gateway's background writer (which batches for ``sample_flush_s``) has
    put the sample on the stream: an unknown id is looked up again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        owner: bytes | None = await redis.get(name)
        if owner is not None or time.monotonic() >= deadline:
            return owner
        await asyncio.sleep(0.025)


@router.post("/v1/feedback")
async def give_feedback(body: Feedback, key: Key, state: State) -> JSONResponse:
    fields = body.fields()
    trusted = key.can_label
    if await to_thread.run_sync(_apply, state.db, body.request_id, key.id, fields, trusted):
        return JSONResponse(_answer(body, "recorded"))
    unknown = NotFound(
        f"No sampled request {body.request_id!r} of this API key: only requests answered with "
        "`x-tunegate-sampled: 1` can be labelled, by the key that made them, under their "
        "`x-tunegate-request-id`.",
        param="request_id", code="sample_not_found")
    redis = state.redis
    if redis is None:
        raise unknown
    stream = state.settings.sample_stream
    from redis.exceptions import RedisError

    try:
        owner = await _owner(redis, owner_key(stream, key.id, body.request_id),
                             wait_s=4 * state.settings.sample_flush_s + 0.25)
        if owner is None:
            raise unknown
        pending = pending_feedback_key(stream, key.id, body.request_id)
        mapping = {k: json.dumps(v) for k, v in fields.items()}
        mapping[TRUSTED_FIELD] = "1" if trusted else "0"
        await (redis.pipeline(transaction=True)
               .hset(pending, mapping=mapping)
               .expire(pending, PENDING_FEEDBACK_TTL_S).execute())
    except (RedisError, OSError) as exc:
        raise Overloaded("The sample is not stored yet and its queue (Redis) is unavailable; "
                         "retry later.") from exc
    # The worker may have stored the sample between the first look and the write above; it reads
    # pending feedback only after storing, so one of the two sides applies it.
    if await to_thread.run_sync(_apply, state.db, body.request_id, key.id, fields, trusted):
        return JSONResponse(_answer(body, "recorded"))
    return JSONResponse(_answer(body, "pending"), status_code=202)
