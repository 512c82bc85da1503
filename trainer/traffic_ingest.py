"""Ingestion of sampled traffic: the gateway's Redis stream into SQL (``traffic_samples``).

The worker runs :func:`ingest_forever` as a background task next to its jobs (not an arq cron
job: those wait for the job slot, which a training run holds for hours). Each round:

1. ``XAUTOCLAIM`` entries another consumer read and never acknowledged for ``claim_idle_s``
   (a worker that died mid-round), then ``XREADGROUP`` new ones (consumer group ``GROUP``);
2. parse each entry as ``shared.traffic_records.SampleRecord``: a bad entry is logged and
   acknowledged (it would never get better), never raised;
3. insert the rows in one transaction, ignoring ``(request_id, lane)`` pairs already stored, and
   commit;
4. only then ``XACK`` and ``XDEL`` the entries. A crash between 3 and 4 re-delivers them and the
   insert is a no-op: nothing is lost, nothing is stored twice;
5. apply feedback that arrived while the samples waited in the stream (``POST /v1/feedback``
   keeps it under ``<stream>:feedback:<key_id>:<request_id>``), then delete it.

The stream is bounded (``MAXLEN ~``, set by the gateway): when the worker is down long enough for
the stream to fill, the oldest samples are trimmed unread. That is the price of never slowing the
request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, tuple_

from shared.db import Database
from shared.traffic_records import (
    ENTRY_FIELD,
    FEEDBACK_FIELDS,
    TRUSTED_FIELD,
    SampleRecord,
    TrafficSample,
    apply_feedback,
    pending_feedback_key,
)

GROUP = "tunegate-ingest"
log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    read: int = 0  # entries taken from the stream (claimed and new)
    stored: int = 0  # rows inserted
    duplicates: int = 0  # entries whose (request_id, lane) was already stored
    bad: int = 0  # entries that were not a valid record (acknowledged and dropped)
    feedback: int = 0  # rows labelled from feedback that arrived before the sample
    oldest_ms: int | None = None  # the oldest entry read: its stream id's time (ms since epoch)


class Ingester:
    def __init__(self, redis: Any, db: Database, *, stream: str, group: str = GROUP,
                 consumer: str | None = None, batch: int = 500,
                 claim_idle_s: float = 60.0) -> None:
        self.redis = redis
        self.db = db
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch = batch
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._group_ready = False

    async def ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # From the stream's start: entries written before the first worker ever ran count.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def run_once(self) -> IngestResult:
        """One round (see the module's docstring); returns what it did."""
        if not self._group_ready:
            await self.ensure_group()
        entries: list[tuple[bytes, Any]] = []
        claimed = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                              min_idle_time=self.claim_idle_ms,
                                              start_id="0-0", count=self.batch)
        entries.extend(claimed[1] if len(claimed) > 1 else [])
        fresh = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                            count=self.batch)
        for _stream, items in fresh or ():
            entries.extend(items)
        result = IngestResult(read=len(entries))
        if not entries:
            return result
        result.oldest_ms = min(_entry_ms(entry_id) for entry_id, _ in entries)
        records: list[SampleRecord] = []
        for entry_id, fields in entries:
            record = _parse(entry_id, fields)
            if record is None:
                result.bad += 1
            else:
                records.append(record)
        if records:
            result.stored = await asyncio.to_thread(store_samples, self.db, records)
            result.duplicates = len(records) - result.stored
        ids = [entry_id for entry_id, _ in entries]
        # Committed above: acknowledging now can lose nothing. XDEL keeps the stream's length
        # equal to the backlog, so MAXLEN only ever trims entries nobody has read.
        await (self.redis.pipeline(transaction=False)
               .xack(self.stream, self.group, *ids).xdel(self.stream, *ids).execute())
        result.feedback = await self._pending_feedback(records)
        return result

    async def _pending_feedback(self, records: list[SampleRecord]) -> int:
        live = [r for r in records if r.key_id and r.lane != "shadow"]
        if not live:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for r in live:
            pipe.hgetall(pending_feedback_key(self.stream, str(r.key_id), r.request_id))
        found = await pipe.execute()
        waiting = []
        for r, raw in zip(live, found, strict=True):
            if raw:
                fields = {k.decode(): json.loads(v) for k, v in raw.items()
                          if k.decode() in FEEDBACK_FIELDS}
                trusted = raw.get(TRUSTED_FIELD.encode()) == b"1"
                waiting.append((r.request_id, str(r.key_id), fields, trusted))
        if not waiting:
            return 0
        n = await asyncio.to_thread(_apply_all, self.db, waiting)
        await self.redis.delete(*{pending_feedback_key(self.stream, key_id, rid)
                                  for rid, key_id, _, _ in waiting})
        return n


def _parse(entry_id: bytes, fields: Any) -> SampleRecord | None:
    if not fields:  # trimmed or deleted while pending (XAUTOCLAIM reports these as empty)
        return None
    raw = fields.get(ENTRY_FIELD.encode(), fields.get(ENTRY_FIELD))
    try:
        if raw is None:
            raise ValueError(f"no field {ENTRY_FIELD!r}")
        return SampleRecord.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        log.warning("dropping traffic entry %s: %s", entry_id.decode(errors="replace"),
                    str(exc).replace("\n", " ")[:500])
        return None


def store_samples(db: Database, records: list[SampleRecord]) -> int:
    """Insert the records' rows, skipping ``(request_id, lane)`` pairs already stored (in the
    table or earlier in ``records``); returns how many rows were inserted."""
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        unique.setdefault((r.request_id, r.lane), r.row())
    rows = list(unique.values())
    dialect = db.engine.dialect.name
    with db.session() as s:
        if dialect in ("sqlite", "postgresql"):
            from sqlalchemy.dialects import postgresql, sqlite

            insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
            stmt = insert(TrafficSample).values(rows).on_conflict_do_nothing(
                index_elements=["request_id", "lane"]).returning(TrafficSample.id)
            # RETURNING counts the inserted rows on both (rowcount is -1 with psycopg here).
            return len(s.execute(stmt).all())
        # Other databases: look the pairs up first (the unique constraint still guards races).
        have = set(s.execute(select(TrafficSample.request_id, TrafficSample.lane).where(
            tuple_(TrafficSample.request_id, TrafficSample.lane).in_(list(unique)))).tuples())
        new = [TrafficSample(**row) for pair, row in unique.items() if pair not in have]
        s.add_all(new)
        return len(new)


def _apply_all(db: Database, waiting: list[tuple[str, str, dict[str, Any], bool]]) -> int:
    with db.session() as s:
        return sum(apply_feedback(s, rid, key_id, fields, trusted=trusted)
                   for rid, key_id, fields, trusted in waiting)


def _entry_ms(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


async def ingest_forever(ingester: Ingester, interval_s: float = 1.0,
                         on_result: Callable[[IngestResult], None] | None = None) -> None:
    """Ingest until cancelled: rounds back to back while there is a backlog, else every
    ``interval_s`` seconds. Errors (Redis or SQL down) are logged and retried; never raised."""
    failing = False
    while True:
        try:
            result = await ingester.run_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("traffic ingestion failed, retrying: %r", exc)
            failing = True
            await asyncio.sleep(max(interval_s, 5.0))
            continue
        if failing:
            log.warning("traffic ingestion works again")
            failing = False
        if on_result is not None:
            on_result(result)
        if result.stored or result.bad:
            log.info("traffic: %d stored, %d duplicates, %d bad, %d labelled from feedback",
                     result.stored, result.duplicates, result.bad, result.feedback)
        if result.read < ingester.batch:
            await asyncio.sleep(interval_s)
