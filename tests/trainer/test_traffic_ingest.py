"""Ingestion of sampled traffic, Redis stream -> SQL, on real Redis with SQLite and PostgreSQL:
idempotent on (request_id, lane), bad entries acknowledged and dropped, entries of a consumer that
died are claimed by another, early feedback applied, and the arq worker runs it by itself."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from shared.db import Database, database_url
from shared.traffic_records import TrafficSample, pending_feedback_key
from tests.shared.test_db import pg  # noqa: F401  (fixture: a PostgreSQL schema per test)
from trainer.settings import TrainerSettings
from trainer.traffic_ingest import GROUP, Ingester
from trainer.worker import create_worker


def sample(request_id: str, **kw: Any) -> dict[str, Any]:
    return {"request_id": request_id, "trace_id": None, "key_id": "key_a",
            "route": "/v1/chat/completions", "model": "sent", "name": "sent", "version": 1,
            "lane": "stable", "output": "fresh", "status": 200, "latency_ms": 12.5,
            "ttft_ms": None, "created_at": time.time(),
            "request": {"messages": [{"role": "user", "content": f"review {request_id}"}]}, **kw}


@pytest.fixture
async def stream(redis_url: str) -> AsyncIterator[tuple[Any, str]]:
    r = aioredis.Redis.from_url(redis_url)
    name = f"tunegate:test:{secrets.token_hex(4)}:traffic"
    yield r, name
    keys = [k async for k in r.scan_iter(match=f"{name}*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def add(r: Any, stream: str, *records: dict[str, Any] | bytes) -> None:
    for rec in records:
        raw = rec if isinstance(rec, bytes) else json.dumps(rec).encode()
        await r.xadd(stream, {"r": raw})


def rows(db: Database) -> list[TrafficSample]:
    with db.session() as s:
        return list(s.scalars(select(TrafficSample).order_by(TrafficSample.id)))


async def exercise(db: Database, r: Any, stream: str) -> None:
    ing = Ingester(r, db, stream=stream, consumer="c1")
    await add(r, stream, sample("a"), sample("a", lane="shadow", output="rotten"), sample("a"),
              b"{not json", json.dumps(sample("b", lane="nonsense")).encode(), sample("c"))
    await r.xadd(stream, {"other": b"x"})
    result = await ing.run_once()
    assert (result.read, result.stored, result.duplicates, result.bad) == (7, 3, 1, 3)
    got = rows(db)
    assert [(x.request_id, x.lane) for x in got] == [("a", "stable"), ("a", "shadow"),
                                                       ("c", "stable")]
    assert got[0].request == sample("a")["request"] and got[0].ref == "sent@v1"
    assert got[0].created_at.tzinfo is not None
    # Everything was acknowledged and deleted: nothing pending, the stream holds no backlog.
    assert (await r.xpending(stream, GROUP))["pending"] == 0 and await r.xlen(stream) == 0
    # The same entry again (a re-delivery after a crash between commit and XACK): no new row.
    await add(r, stream, sample("a"))
    result = await ing.run_once()
    assert (result.stored, result.duplicates) == (0, 1) and len(rows(db)) == 3


async def test_ingest_on_sqlite(tmp_path: Path, stream: tuple[Any, str]) -> None:
    db = Database(database_url(tmp_path))
    await exercise(db, *stream)
    db.dispose()


async def test_ingest_on_postgresql(pg: Database, stream: tuple[Any, str]) -> None:  # noqa: F811
    await exercise(pg, *stream)


async def test_entries_of_a_dead_consumer_are_claimed(tmp_path: Path,
                                                      stream: tuple[Any, str]) -> None:
    r, name = stream
    db = Database(database_url(tmp_path))
    dead = Ingester(r, db, stream=name, consumer="dead")
    await dead.ensure_group()
    await add(r, name, sample("x"), sample("y"))
    # "dead" reads both and dies before storing or acknowledging them.
    assert len((await r.xreadgroup(GROUP, "dead", {name: ">"}, count=10))[0][1]) == 2
    alive = Ingester(r, db, stream=name, consumer="alive", claim_idle_s=0.0)
    result = await alive.run_once()
    assert result.stored == 2 and {x.request_id for x in rows(db)} == {"x", "y"}
    assert (await r.xpending(name, GROUP))["pending"] == 0
    db.dispose()


async def test_feedback_waiting_in_redis_is_applied(tmp_path: Path,
                                                    stream: tuple[Any, str]) -> None:
    r, name = stream
    db = Database(database_url(tmp_path))
    await r.hset(pending_feedback_key(name, "key_a", "f"), mapping={
        "label": json.dumps("rotten"), "score": json.dumps(0.0), "_trusted": "1"})
    await add(r, name, sample("f"), sample("f", lane="shadow"), sample("g", key_id="key_b"))
    result = await Ingester(r, db, stream=name).run_once()
    assert result.feedback == 1
    by = {(x.request_id, x.lane): x for x in rows(db)}
    live = by[("f", "stable")]
    assert (live.label, live.score, live.feedback_at is not None) == ("rotten", 0.0, True)
    assert (live.feedback_key_id, live.feedback_trusted) == ("key_a", True)
    assert by[("f", "shadow")].label is None and by[("g", "stable")].label is None
    assert not await r.exists(pending_feedback_key(name, "key_a", "f"))
    db.dispose()


async def test_worker_ingests_in_the_background(tmp_path: Path, redis_url: str,
                                                stream: tuple[Any, str]) -> None:
    r, name = stream
    settings = TrainerSettings(redis_url=redis_url, data_dir=tmp_path, traffic_stream=name,
                               ingest_interval_s=0.1,
                               queue_name=f"tunegate:test:{secrets.token_hex(4)}")
    worker = create_worker(settings, handle_signals=False)
    run = asyncio.create_task(worker.async_run())
    try:
        await add(r, name, sample("w1"), sample("w2"))
        db = Database(database_url(tmp_path))
        deadline = time.monotonic() + 30
        while len(rows(db)) < 2:
            assert time.monotonic() < deadline, "the worker did not ingest"
            await asyncio.sleep(0.2)
        db.dispose()
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await worker.close()
