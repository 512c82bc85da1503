"""Engine replicas that registered themselves (``POST /admin/replicas``), kept in SQL so every
gateway process sees the same set.

A replica is its base URL (``http(s)://host[:port][/prefix]``, normalized by :func:`replica_url`).
Registration is idempotent: registering a known URL again only refreshes ``last_seen`` (and
``kind``), which is how a registrar's heartbeat shows it is still there.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, Database, UTCDateTime, utcnow
from shared.errors import InvalidRequest


class RegisteredReplica(Base):
    __tablename__ = "engine_replicas"

    url: Mapped[str] = mapped_column(String(500), primary_key=True)
    kind: Mapped[str | None] = mapped_column(String(32), nullable=True)  # "vllm", "embedded", ...
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


@dataclass(frozen=True)
class ReplicaRecord:
    url: str
    kind: str | None
    registered_at: dt.datetime
    last_seen: dt.datetime

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "kind": self.kind,
                "registered_at": int(self.registered_at.timestamp()),
                "last_seen": int(self.last_seen.timestamp())}


def _record(row: RegisteredReplica) -> ReplicaRecord:
    return ReplicaRecord(row.url, row.kind, row.registered_at, row.last_seen)


def replica_url(raw: str) -> str:
    """The canonical form of a replica's base URL (lower-case scheme and host, no trailing
    slash); :class:`InvalidRequest` (``param="url"``) unless it is ``http``/``https`` with a host,
    a valid port and neither credentials, query nor fragment."""
    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"Invalid replica URL {raw!r}: {why}.", param="url",
                              code="invalid_url")

    parts = urlsplit(raw.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("the scheme must be http or https")
    if not parts.hostname:
        raise bad("it has no host")
    try:
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError:
        raise bad("the port is not a number between 1 and 65535") from None
    if port == 0:
        raise bad("the port is not a number between 1 and 65535")
    if parts.username is not None or parts.password is not None:
        raise bad("credentials do not belong in it")
    if parts.query or parts.fragment:
        raise bad("a base URL has no query or fragment")
    host = parts.hostname.lower()
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


class ReplicaStore:
    """Registered replicas in SQL. Blocking calls: run them in a worker thread from async code."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def register(self, url: str, kind: str | None = None) -> tuple[ReplicaRecord, bool]:
        """Add ``url`` (already normalized) or refresh it; returns the record and whether it
        is new."""
        for _ in range(2):  # a concurrent first registration of the same URL wins the insert
            try:
                with self.db.session() as s:
                    row = s.get(RegisteredReplica, url)
                    created = row is None
                    if row is None:
                        row = RegisteredReplica(url=url, kind=kind)
                        s.add(row)
                    else:
                        row.last_seen = utcnow()
                        row.kind = kind or row.kind
                    s.flush()
                    return _record(row), created
            except IntegrityError:
                continue
        raise RuntimeError(f"registering {url} kept conflicting")  # pragma: no cover

    def deregister(self, url: str) -> bool:
        """Remove ``url``; False when it was not registered."""
        with self.db.session() as s:
            row = s.get(RegisteredReplica, url)
            if row is None:
                return False
            s.delete(row)
            return True

    def records(self) -> list[ReplicaRecord]:
        with self.db.session() as s:
            rows = s.scalars(select(RegisteredReplica).order_by(RegisteredReplica.registered_at))
            return [_record(r) for r in rows]

    def urls(self) -> list[str]:
        with self.db.session() as s:
            return list(s.scalars(select(RegisteredReplica.url)
                                  .order_by(RegisteredReplica.registered_at)))
