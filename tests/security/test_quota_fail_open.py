"""Point 1: one request cannot switch quotas off. Only a lost Redis connection may skip the
check (and an operator can make that a 503); a script or value error refuses that request alone;
``max_tokens`` is bounded by the model's context at the gateway."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from gateway.auth import KeyInfo
from gateway.metrics import Metrics
from gateway.quotas import Quotas
from shared.errors import RateLimited
from tests.gateway.conftest import Records, chat, fresh_window, gateway
from tests.procs import free_port


def _key(**limits: int) -> KeyInfo:
    return KeyInfo(id="key_" + uuid.uuid4().hex, name="t", scope="user", prefix="tg-",
                   models=None, rpm=limits.get("rpm"), tpm=limits.get("tpm"), created_at="",
                   revoked_at=None)


def _fail_open_count(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    line = next(x for x in text.splitlines()
                if x.startswith("tunegate_gateway_quota_fail_open_total"))
    return float(line.split()[-1])


def test_huge_max_tokens_is_400_and_quotas_stay_on(engine: str, data_dir: Path, redis_url: str,
                                                    records: Records) -> None:
    rpm_only = records.key("user", rpm=50)
    other = records.key("user", rpm=1)
    with gateway(data_dir, [engine], redis_url) as g:
        fresh_window(redis_url)
        r = chat(g, rpm_only, max_tokens=10**17)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = chat(g, rpm_only, max_completion_tokens=10**17)
        assert r.status_code == 400
        r = chat(g, rpm_only, max_tokens=4096)  # over the replica's 2048-token context
        assert r.status_code == 400
        assert chat(g, other).status_code == 200
        assert chat(g, other).status_code == 429  # still enforced for everyone else
        assert _fail_open_count(g) == 0


async def test_script_error_refuses_only_that_request(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    quotas = Quotas(client, Metrics())
    fresh_window(redis_url)
    try:
        # The Lua script cannot count 10**17 (HINCRBY of a float): that request is refused...
        with pytest.raises(RateLimited) as err:
            await quotas.reserve(_key(rpm=50), 10**17)
        assert err.value.code == "quota_check_failed"
        # ... and no other request skips its check because of it.
        strict = _key(rpm=1)
        assert await quotas.reserve(strict, 10) is not None
        with pytest.raises(RateLimited) as err:
            await quotas.reserve(strict, 10)
        assert err.value.code == "rate_limit_exceeded"
    finally:
        await client.aclose()


def test_lost_redis_can_fail_closed(engine: str, data_dir: Path, records: Records) -> None:
    key = records.key("user", rpm=100)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with gateway(data_dir, [engine], dead,
                 env={"TUNEGATE_GATEWAY_QUOTA_FAIL_OPEN": "false"}) as g:
        for _ in range(2):
            r = chat(g, key)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "quota_unavailable"
        assert _fail_open_count(g) == 0
    with gateway(data_dir, [engine], dead) as g:  # the default: fail open, counted
        assert chat(g, key).status_code == 200
        assert _fail_open_count(g) >= 1
