"""Sampled production traffic: the SQL record of one served request, and its feedback.

The gateway decides whether to sample a request and puts a scrubbed record on a bounded Redis
stream; the worker moves stream entries into this table. Feedback (``POST /v1/feedback``) labels
a row; labelled rows become evaluation and training data, and the quality monitor scores rows per
adapter version.

``lane`` says how the request was served: ``stable`` (the alias a bare ``NAME`` resolves to),
``canary`` (the weighted share sent to the canary version), ``shadow`` (a mirrored copy answered by
a candidate and never returned to the client; it shares ``request_id`` with the live row),
``pinned`` (the client named an alias or ``NAME@vN`` itself) or ``base``.

The stream between gateway and worker: one entry per record, its field ``r`` the record as JSON
(:class:`SampleRecord`; ``created_at`` in unix seconds). Next to the stream the gateway keeps, for
each sampled live request, ``<stream>:owner:<request_id>`` = the key id (an hour), so feedback on a
request still waiting in the stream can be told apart from an unknown id; such feedback waits in
``<stream>:feedback:<request_id>`` (a day) until the worker ingests the sample and applies it.

Feedback labels the rows the client saw (every lane but ``shadow``); a shadow row is judged by
joining on ``request_id`` with its live row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.db import Base, UTCDateTime, utcnow

LANES = ("stable", "canary", "shadow", "pinned", "base")
Lane = Literal["stable", "canary", "shadow", "pinned", "base"]
STREAM = "tunegate:traffic"  # the default stream name (gateway and worker settings)
ENTRY_FIELD = "r"
OWNER_TTL_S = 3600  # how long feedback may arrive before the sample is ingested, seconds
PENDING_FEEDBACK_TTL_S = 24 * 3600  # how long early feedback waits for the worker, seconds
FEEDBACK_FIELDS = ("label", "score", "corrected_output")


def owner_key(stream: str, request_id: str) -> str:
    return f"{stream}:owner:{request_id}"


def pending_feedback_key(stream: str, request_id: str) -> str:
    return f"{stream}:feedback:{request_id}"


class TrafficSample(Base):
    __tablename__ = "traffic_samples"
    __table_args__ = (
        UniqueConstraint("request_id", "lane"),
        Index("ix_traffic_samples_version", "name", "version", "created_at"),
        Index("ix_traffic_samples_key", "key_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64))
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    route: Mapped[str] = mapped_column(String(40))  # engine path, e.g. "/v1/chat/completions"
    model: Mapped[str] = mapped_column(String(200))  # what the client asked for
    name: Mapped[str] = mapped_column(String(64))  # adapter name, or "base"
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None for the base
    lane: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column()  # the client's body, scrubbed
    output: Mapped[str] = mapped_column(Text)  # the answer's text (streams reassembled), scrubbed
    status: Mapped[int] = mapped_column(Integer)  # HTTP status the client got
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # streams only
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Feedback, set by POST /v1/feedback (only by the key that made the request).
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    corrected_output: Mapped[str | None] = mapped_column(Text, nullable=True)
    feedback_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Who gave it: "key:<id>" of the client's own key, or of the admin labelling in the console.
    feedback_by: Mapped[str | None] = mapped_column(String(60), nullable=True)

    @property
    def ref(self) -> str:
        return "base" if self.version is None else f"{self.name}@v{self.version}"


class SampleRecord(BaseModel):
    """One stream entry: what the gateway records (scrubbed) and the worker ingests."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(min_length=1, max_length=64)
    trace_id: str | None = Field(default=None, max_length=32)
    key_id: str | None = Field(default=None, max_length=40)
    route: str = Field(max_length=40)
    model: str = Field(max_length=200)
    name: str = Field(min_length=1, max_length=64)
    version: int | None = None
    lane: Lane
    request: dict[str, Any]
    output: str = ""
    status: int
    latency_ms: float
    ttft_ms: float | None = None
    created_at: float  # unix seconds

    def row(self) -> dict[str, Any]:
        """Column values for :class:`TrafficSample`."""
        values = self.model_dump()
        values["created_at"] = dt.datetime.fromtimestamp(self.created_at, dt.UTC)
        return values


def apply_feedback(session: Session, request_id: str, key_id: str,
                   feedback: dict[str, Any]) -> int:
    """Set the given feedback fields on the rows of ``request_id`` that ``key_id`` made (shadow
    rows excepted); returns how many rows changed. Fields not given keep their values."""
    values = {k: v for k, v in feedback.items() if k in FEEDBACK_FIELDS and v is not None}
    if not values:
        return 0
    res = session.execute(
        update(TrafficSample)
        .where(TrafficSample.request_id == request_id, TrafficSample.key_id == key_id,
               TrafficSample.lane != "shadow")
        .values(**values, feedback_at=utcnow()))
    return int(res.rowcount)  # type: ignore[attr-defined]


__all__ = ["ENTRY_FIELD", "LANES", "STREAM", "SampleRecord", "TrafficSample", "apply_feedback",
           "owner_key", "pending_feedback_key"]
