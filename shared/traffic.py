"""Sampled production traffic: the SQL record of one served request, and its feedback.

The gateway decides whether to sample a request and puts a scrubbed record on a bounded Redis
stream; the worker moves stream entries into this table. Feedback (``POST /v1/feedback``) labels
a row; labelled rows become evaluation and training data, and the quality monitor scores rows per
adapter version.

``lane`` says how the request was served: ``stable`` (the alias a bare ``NAME`` resolves to),
``canary`` (the weighted share sent to the canary version), ``shadow`` (a mirrored copy answered by
a candidate and never returned to the client; it shares ``request_id`` with the live row),
``pinned`` (the client named an alias or ``NAME@vN`` itself) or ``base``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, UTCDateTime, utcnow

LANES = ("stable", "canary", "shadow", "pinned", "base")


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

    @property
    def ref(self) -> str:
        return "base" if self.version is None else f"{self.name}@v{self.version}"


__all__ = ["LANES", "TrafficSample"]
