"""Point 2: no token-quota bypass. The gateway reserves what the engine will be allowed to
produce (the larger of max_tokens and max_completion_tokens, written into the upstream body; the
context when neither is set), counts token-id prompts, and charges settled excess to the window
it was produced in. Under mixed concurrent load over two gateway processes no key is served more
than its tpm in a window. The replica reports usage as an engine running to its limit would."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import httpx

from bench.common import mixed_quota_request
from gateway.auth import KeyInfo
from gateway.metrics import Metrics
from gateway.quotas import Quotas, Reservation
from tests.gateway.conftest import Records, auth, chat, fresh_window, gateway

TPM = 3000


def test_max_completion_tokens_is_reserved(engine: str, data_dir: Path, redis_url: str,
                                           records: Records) -> None:
    key = records.key("user", tpm=300)
    with gateway(data_dir, [engine], redis_url) as g:
        fresh_window(redis_url)
        r = chat(g, key, max_tokens=1, max_completion_tokens=400)
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_exceed_limit"
        r = chat(g, key, max_tokens=1, max_completion_tokens=100)
        assert r.status_code == 200
        # The bound went upstream in both fields: the engine was allowed 100, not more.
        assert r.json()["usage"]["completion_tokens"] == 100
        # Token-id prompts count: 400 ids are 400 prompt tokens.
        r = httpx.post(g + "/v1/completions", headers=auth(key), timeout=30,
                       json={"model": "base", "prompt": [7] * 400, "max_tokens": 5})
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_exceed_limit"


def test_mixed_load_over_two_gateways_never_exceeds_tpm(engine: str, data_dir: Path,
                                                         redis_url: str,
                                                         records: Records) -> None:
    key = records.key("user", tpm=TPM)
    with gateway(data_dir, [engine], redis_url) as g1, gateway(data_dir, [engine],
                                                               redis_url) as g2:
        fresh_window(redis_url)

        async def load() -> list[tuple[int, int]]:
            results: list[tuple[int, int]] = []
            limits = httpx.Limits(max_connections=60)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                async def worker(i: int) -> None:
                    rng = random.Random(i)
                    for j in range(8):
                        results.append(await mixed_quota_request(
                            client, (g1, g2)[(i + j) % 2], auth(key), rng, most=300))

                await asyncio.gather(*(worker(i) for i in range(50)))
            return results

        results = asyncio.run(load())
    served = sum(t for s, t in results if s == 200)
    codes = {s for s, _ in results}
    assert codes <= {200, 429}, codes
    assert 429 in codes  # the limit was reached...
    assert served <= TPM, served  # ...and never passed


async def test_excess_is_charged_to_the_window_it_was_produced_in(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    key = KeyInfo(id="key_" + uuid.uuid4().hex, name="t", scope="user", prefix="tg-",
                  models=None, rpm=None, tpm=99, created_at="", revoked_at=None)  # leases of 1
    quotas = Quotas(client, Metrics())
    fresh_window(redis_url)
    try:
        now = await quotas.reserve(key, 10)
        assert now is not None
        prefix, _, window = now.redis_key.rpartition(":")
        # A request reserved 10 tokens in the previous minute and used 50 by now.
        await quotas.settle(Reservation(f"{prefix}:{int(window) - 1}", 10), 50)
        await quotas.flush()
        assert int(await client.hget(now.redis_key, "t")) == 10 + 40
    finally:
        await client.aclose()
