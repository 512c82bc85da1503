"""Quotas shared by two gateway processes through one real Redis; Redis down fails open."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Records, chat, fake_replica, fresh_window, gateway
from tests.procs import free_port


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with fake_replica("r1") as (url, _):
        yield url


def test_two_gateways_share_one_budget(engine: str, data_dir: Path, redis_url: str,
                                       records: Records) -> None:
    key = records.key("user", rpm=4)
    with gateway(data_dir, [engine], redis_url) as g1, gateway(data_dir, [engine], redis_url) as g2:
        fresh_window(redis_url)
        codes = [chat(g, key).status_code for g in (g1, g2, g1, g2)]
        assert codes == [200, 200, 200, 200]
        for g in (g1, g2):
            r = chat(g, key)
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["retry-after"]) <= 60
        # Another key has its own budget.
        assert chat(g1, records.key("user", rpm=1)).status_code == 200


def test_tokens_per_minute(engine: str, data_dir: Path, redis_url: str,
                           records: Records) -> None:
    key = records.key("user", tpm=300)
    with gateway(data_dir, [engine], redis_url) as g:
        fresh_window(redis_url)
        r = chat(g, key, max_tokens=1000)  # the reservation alone is over the limit
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_exceed_limit"
        # Each reserves 234 (200 + an upper bound of the prompt: its bytes plus the chat
        # template's allowance) and settles to the real 8 tokens (corrections are written every
        # 0.05 s): many fit in 300 per minute.
        for _ in range(5):
            assert chat(g, key, max_tokens=200).status_code == 200
            time.sleep(0.2)
        # The budget is charged with real usage: 5 x 8 tokens, plus this reservation (234).
        assert chat(g, key, max_tokens=200).status_code == 200
        assert chat(g, key, max_tokens=250).status_code == 429  # 48 settled + 284 reserved > 300


def test_redis_down_fails_open(engine: str, data_dir: Path, records: Records) -> None:
    key = records.key("user", rpm=1)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with gateway(data_dir, [engine], dead) as g:
        assert all(chat(g, key).status_code == 200 for _ in range(3))
        text = httpx.get(g + "/metrics").text
        line = next(x for x in text.splitlines()
                    if x.startswith("tunegate_gateway_quota_fail_open_total"))
        assert float(line.split()[-1]) >= 3


async def test_leases_take_one_percent_per_redis_call(redis_url: str) -> None:
    import uuid

    import redis.asyncio as aioredis

    from gateway.auth import KeyInfo
    from gateway.metrics import Metrics
    from gateway.quotas import Quotas

    key = KeyInfo(id="key_" + uuid.uuid4().hex, name="t", scope="user", prefix="tg-",
                  models=None, rpm=1000, tpm=None, created_at="", revoked_at=None)
    client = aioredis.Redis.from_url(redis_url)
    quotas = Quotas(client, Metrics())
    fresh_window(redis_url)

    async def counted() -> int:
        keys = [k async for k in client.scan_iter(f"tg:quota:{key.id}:*")]
        return int(await client.hget(keys[0], "r"))

    try:
        await quotas.reserve(key, 10)
        assert await counted() == 10  # 1% of 1000 taken at once
        for _ in range(9):
            await quotas.reserve(key, 10)  # spent locally
        assert await counted() == 10
        await quotas.reserve(key, 10)
        assert await counted() == 20
    finally:
        await client.aclose()
