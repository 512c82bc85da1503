"""Sampled production traffic: the SQL record of one served request, and its feedback.

The gateway decides whether to sample a request and puts a scrubbed record on a bounded Redis
stream; the worker moves stream entries into this table. Feedback (``POST /v1/feedback``) labels
a row; labelled rows become evaluation and training data, and the quality monitor scores rows per
adapter version.

``lane`` says how the request was served: ``stable`` (the alias a bare ``NAME`` resolves to),
``canary`` (the weighted share sent to the canary version), ``shadow`` (a mirrored copy answered by
a candidate and never returned to the client; it shares ``request_id`` with the live row),
``pinned`` (the client named an alias or ``NAME@vN`` itself) or ``base``.

Request ids: ``request_id`` is the id the gateway made for the request (32 hex characters, sent
back as ``x-tunegate-request-id``); a client's own ``X-Request-ID`` is kept as
``client_request_id`` and echoed, never used to find a row, so one key cannot aim at another's
samples by reusing its ids. Every request id is at most :data:`REQUEST_ID_MAX_LEN` printable ASCII
characters, in the gateway's header check, on the stream, in SQL and in feedback bodies alike.

The stream between gateway and worker: one entry per record, its field ``r`` the record as JSON
(:class:`SampleRecord`; ``created_at`` in unix seconds). Next to the stream the gateway keeps, for
each sampled live request, ``<stream>:owner:<key_id>:<request_id>`` (an hour), so feedback on a
request still waiting in the stream can be told apart from an unknown id; such feedback waits in
``<stream>:feedback:<key_id>:<request_id>`` (a day) until the worker ingests the sample and
applies it. Both are keyed by the key too: a key can neither see nor label another's entries.

Each label records the key that gave it (``feedback_key_id``) and whether that key may label
(``feedback_trusted``: a key setting, admin keys by default). Only trusted labels become training
or golden data; anyone's label is kept for the record.

Feedback labels the rows the client saw (every lane but ``shadow``); a shadow row is judged by
joining on ``request_id`` with its live row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Boolean, Float, Index, Integer, String, Text, UniqueConstraint, false, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.db import Base, UTCDateTime, utcnow

LANES = ("stable", "canary", "shadow", "pinned", "base")
Lane = Literal["stable", "canary", "shadow", "pinned", "base"]
STREAM = "tunegate:traffic"  # the default stream name (gateway and worker settings)
ENTRY_FIELD = "r"
OWNER_TTL_S = 3600  # how long feedback may arrive before the sample is ingested, seconds
PENDING_FEEDBACK_TTL_S = 24 * 3600  # how long early feedback waits for the worker, seconds
FEEDBACK_FIELDS = ("label", "score", "corrected_output")
REQUEST_ID_MAX_LEN = 128  # characters, printable ASCII: the one rule for every request id
TRUSTED_FIELD = "_trusted"  # in a pending feedback hash: "1" when the key may label


def valid_request_id(raw: bytes) -> bool:
    """The one request-id rule: 1..REQUEST_ID_MAX_LEN printable ASCII bytes, no spaces."""
    return 0 < len(raw) <= REQUEST_ID_MAX_LEN and all(33 <= b < 127 for b in raw)


def owner_key(stream: str, key_id: str, request_id: str) -> str:
    return f"{stream}:owner:{key_id}:{request_id}"


def pending_feedback_key(stream: str, key_id: str, request_id: str) -> str:
    return f"{stream}:feedback:{key_id}:{request_id}"


class TrafficSample(Base):
    __tablename__ = "traffic_samples"
    __table_args__ = (
        UniqueConstraint("request_id", "lane"),
        Index("ix_traffic_samples_version", "name", "version", "created_at"),
        Index("ix_traffic_samples_key", "key_id", "created_at"),
        # The quality monitor's window over every adapter; one adapter's window (any version).
        Index("ix_traffic_samples_created_at", "created_at"),
        Index("ix_traffic_samples_name_time", "name", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX_LEN))  # the gateway's id
    client_request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX_LEN),
                                                          nullable=True)  # the client's header
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
    # Feedback, set by POST /v1/feedback (only by the key that made the request), with who gave
    # it and whether that key may label (only trusted labels become training data).
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    corrected_output: Mapped[str | None] = mapped_column(Text, nullable=True)
    feedback_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    feedback_key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    feedback_trusted: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   server_default=false())

    @property
    def ref(self) -> str:
        return "base" if self.version is None else f"{self.name}@v{self.version}"


class SampleRecord(BaseModel):
    """One stream entry: what the gateway records (scrubbed) and the worker ingests."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(min_length=1, max_length=REQUEST_ID_MAX_LEN)
    client_request_id: str | None = Field(default=None, max_length=REQUEST_ID_MAX_LEN)
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
                   feedback: dict[str, Any], *, trusted: bool = False) -> int:
    """Set the given feedback fields on the rows of ``request_id`` that ``key_id`` made (shadow
    rows excepted), recording ``key_id`` as who gave it and ``trusted`` (the key may label);
    returns how many rows changed. Fields not given keep their values."""
    values = {k: v for k, v in feedback.items() if k in FEEDBACK_FIELDS and v is not None}
    if not values:
        return 0
    res = session.execute(
        update(TrafficSample)
        .where(TrafficSample.request_id == request_id, TrafficSample.key_id == key_id,
               TrafficSample.lane != "shadow")
        .values(**values, feedback_at=utcnow(), feedback_key_id=key_id,
                feedback_trusted=trusted))
    return int(res.rowcount)  # type: ignore[attr-defined]


__all__ = ["ENTRY_FIELD", "LANES", "REQUEST_ID_MAX_LEN", "STREAM", "TRUSTED_FIELD", "SampleRecord",
           "TrafficSample", "apply_feedback", "owner_key", "pending_feedback_key",
           "valid_request_id"]
