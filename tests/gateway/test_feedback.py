"""``POST /v1/feedback`` through a real gateway process (fake engine, real Redis, SQLite): feedback
before ingestion waits and is applied by the ingester, after it is recorded at once; a key labels
only its own requests; errors are OpenAI-shaped."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from shared.db import Database, database_url
from shared.traffic_records import TrafficSample
from tests.gateway.conftest import Records, auth, fake_replica, gateway
from tests.gateway.test_traffic_sampler import record_of, rid, sampling_env
from trainer.traffic_ingest import Ingester


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, records: Records) -> Iterator[dict[str, Any]]:
    import redis

    stream = f"tunegate:test:{secrets.token_hex(4)}:traffic"
    with fake_replica("r1") as (engine, _), gateway(
            data_dir, [engine], redis_url, env=sampling_env(stream)) as url:
        r = redis.Redis.from_url(redis_url)
        yield {"url": url, "stream": stream, "redis": r, "redis_url": redis_url,
               "db": Database(database_url(data_dir)),
               "key": records.key(), "other": records.key(), "opt_out": records.key(sample_rate=0)}
        for k in r.scan_iter(match=f"{stream}*"):
            r.delete(k)
        r.close()


def ask(system: dict[str, Any], key: str) -> str:
    r_id = rid()
    resp = httpx.post(system["url"] + "/v1/chat/completions", timeout=30,
                      headers={**auth(key), "x-request-id": r_id},
                      json={"model": "base", "messages": [{"role": "user", "content": r_id}]})
    assert resp.status_code == 200
    return resp.headers["x-tunegate-request-id"]  # the id feedback names (not the client's)


def feedback(system: dict[str, Any], key: str, body: Any) -> httpx.Response:
    return httpx.post(system["url"] + "/v1/feedback", headers=auth(key), json=body, timeout=30)


def ingest(system: dict[str, Any]) -> None:
    async def run() -> None:
        r = aioredis.Redis.from_url(system["redis_url"])
        try:
            await Ingester(r, system["db"], stream=system["stream"]).run_once()
        finally:
            await r.aclose()

    asyncio.run(run())


def row(system: dict[str, Any], r_id: str) -> TrafficSample:
    with system["db"].session() as s:
        found = s.scalars(select(TrafficSample).where(TrafficSample.request_id == r_id)).one()
        return found  # type: ignore[no-any-return]


def test_feedback_before_and_after_ingestion(system: dict[str, Any]) -> None:
    r_id = ask(system, system["key"])
    record_of(system, r_id)  # on the stream, not yet in SQL
    early = feedback(system, system["key"], {"request_id": r_id, "label": "fresh"})
    assert early.status_code == 202, early.text
    assert early.json() == {"object": "feedback", "request_id": r_id, "status": "pending",
                            "label": "fresh"}
    ingest(system)
    assert row(system, r_id).label == "fresh"
    later = feedback(system, system["key"], {"request_id": r_id, "score": 0.5,
                                             "corrected_output": "fresh!"})
    assert later.status_code == 200 and later.json()["status"] == "recorded"
    got = row(system, r_id)
    assert (got.label, got.score, got.corrected_output) == ("fresh", 0.5, "fresh!")
    assert got.feedback_at is not None


def test_feedback_right_after_the_answer_is_pending_not_lost(system: dict[str, Any]) -> None:
    # No waiting for the stream: the client labels the moment its answer arrives, while the
    # gateway's writer may still hold the sample in its batch.
    for _ in range(5):
        r_id = ask(system, system["key"])
        early = feedback(system, system["key"], {"request_id": r_id, "label": "rotten"})
        assert early.status_code == 202, early.text
    ingest(system)
    assert row(system, r_id).label == "rotten"


def test_only_the_key_that_asked_may_label(system: dict[str, Any]) -> None:
    r_id = ask(system, system["key"])
    record_of(system, r_id)
    unknown = feedback(system, system["key"], {"request_id": "t-never-made", "label": "x"})
    pending_other = feedback(system, system["other"], {"request_id": r_id, "label": "x"})
    ingest(system)
    stored_other = feedback(system, system["other"], {"request_id": r_id, "label": "x"})
    for resp in (unknown, pending_other, stored_other):
        assert resp.status_code == 404
        err = resp.json()["error"]
        assert err["type"] == "not_found_error" and err["code"] == "sample_not_found"
        assert err["param"] == "request_id" and "x-tunegate-sampled" in err["message"]
    # The same answer for another key's request and for an unknown id: nothing leaks.
    assert pending_other.json() == stored_other.json()
    assert row(system, r_id).label is None


def test_unsampled_requests_cannot_be_labelled(system: dict[str, Any]) -> None:
    r_id = ask(system, system["opt_out"])
    resp = feedback(system, system["opt_out"], {"request_id": r_id, "label": "x"})
    assert resp.status_code == 404


@pytest.mark.parametrize("body", [
    {"request_id": "r"},  # nothing given
    {"request_id": "r", "score": 1.5},
    {"request_id": "r", "label": ""},
    {"request_id": "", "label": "x"},
    {"label": "x"},
    {"request_id": "r", "label": "x", "extra": 1},
    ["not", "an", "object"],
])
def test_invalid_bodies_are_400(system: dict[str, Any], body: Any) -> None:
    resp = feedback(system, system["key"], body)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_needs_a_key(system: dict[str, Any]) -> None:
    resp = httpx.post(system["url"] + "/v1/feedback", json={"request_id": "r", "label": "x"})
    assert resp.status_code == 401
