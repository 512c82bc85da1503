"""Fixtures of the trust-boundary regression tests (feedback, sampling, engines, registry): a
gateway process in front of a fake engine replica with every ``base`` request sampled, real
Redis, SQLite in a folder of its own. Test modules import the fixtures they use."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared.db import Database, database_url
from tests.gateway.conftest import Records, auth, fake_replica, gateway
from tests.gateway.test_feedback import feedback
from tests.gateway.test_feedback import ingest as ingest_samples
from tests.gateway.test_traffic_sampler import sampling_env


@pytest.fixture(scope="module")
def trust_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trust")


@pytest.fixture(scope="module")
def trust_records(trust_dir: Path) -> Records:
    return Records(trust_dir)


@pytest.fixture(scope="module")
def sampled(trust_dir: Path, redis_url: str, trust_records: Records) -> Iterator[dict[str, Any]]:
    """A gateway sampling every ``base`` request onto a stream of its own."""
    stream = f"tunegate:test:{secrets.token_hex(4)}:traffic"
    with fake_replica("r1") as (engine, _), gateway(
            trust_dir, [engine], redis_url, env=sampling_env(stream)) as url:
        r = redis.Redis.from_url(redis_url)
        yield {"url": url, "stream": stream, "redis": r, "redis_url": redis_url,
               "db": Database(database_url(trust_dir)), "records": trust_records}
        for k in r.scan_iter(match=f"{stream}*"):
            r.delete(k)
        r.close()


def ask(system: dict[str, Any], key: str, client_id: str | None = None,
        content: str = "hello") -> httpx.Response:
    headers = auth(key)
    if client_id is not None:
        headers["x-request-id"] = client_id
    resp = httpx.post(system["url"] + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "base", "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("x-tunegate-sampled") == "1"
    return resp


# The feedback call and the stream-to-SQL step are the feedback tests' own.
give_feedback, ingest = feedback, ingest_samples
