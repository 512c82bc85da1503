"""Point 2: no token-quota bypass. The gateway reserves what the engine will be allowed to
produce (the larger of max_tokens and max_completion_tokens, written into the upstream body; the
context when neither is set), counts token-id prompts, and charges settled excess to the window
it was produced in. Under mixed concurrent load over two gateway processes no key is served more
than its tpm in a window. The replica reports usage as an engine running to its limit would."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path
from typing import Any

import httpx

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


async def _one(client: httpx.AsyncClient, base: str, key: str, rng: random.Random,
               ) -> tuple[int, int]:
    """One request of a random kind; returns (status, tokens served)."""
    kind = rng.randrange(5)
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"model": "base", "stream": stream}
    path = "/v1/chat/completions"
    if kind == 0:
        body.update(max_tokens=1, max_completion_tokens=rng.randrange(50, 300))
    elif kind == 1:
        body.update(max_tokens=rng.randrange(50, 300))
    elif kind == 2:
        pass  # neither: the engine may run to its context
    elif kind == 3:
        body.update(max_completion_tokens=rng.randrange(50, 300))
    if kind == 4:
        path = "/v1/completions"
        body.update(prompt=[rng.randrange(1000) for _ in range(rng.randrange(1, 200))])
        if rng.random() < 0.5:
            body["max_tokens"] = rng.randrange(1, 200)
    else:
        body["messages"] = [{"role": "user", "content": "é" * rng.randrange(1, 100)}]
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", base + path, headers=auth(key), json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0
        if not stream:
            return 200, int(json.loads(await r.aread())["usage"]["total_tokens"])
        served = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    served = int(usage["total_tokens"])
        return 200, served


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
                        results.append(await _one(client, (g1, g2)[(i + j) % 2], key, rng))

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
