"""The request-path cache: single flight, stale while revalidate, invalidation, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.cache import AsyncTTLCache


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.value = "v1"
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> str:
        self.gate.wait(5)
        self.calls += 1
        if self.fail:
            raise KeyError("boom")
        return self.value


async def test_concurrent_misses_share_one_load() -> None:
    cache: AsyncTTLCache[str] = AsyncTTLCache(ttl_s=60)
    load = Loader()
    load.gate.clear()
    tasks = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0.05)
    load.gate.set()
    assert await asyncio.gather(*tasks) == ["v1"] * 20
    assert load.calls == 1


async def test_stale_value_served_while_refreshing() -> None:
    cache: AsyncTTLCache[str] = AsyncTTLCache(ttl_s=1.0)
    load = Loader()
    assert await cache.get("k", load) == "v1"
    load.value = "v2"
    await asyncio.sleep(1.1)
    assert await cache.get("k", load) == "v1"  # expired < 1 TTL ago: served stale, refreshing
    for _ in range(100):
        await asyncio.sleep(0.01)
        if load.calls == 2:
            break
    assert await cache.get("k", load) == "v2"


async def test_long_expired_entries_are_loaded_before_answering() -> None:
    cache: AsyncTTLCache[str] = AsyncTTLCache(ttl_s=0.05)
    load = Loader()
    assert await cache.get("k", load) == "v1"
    load.value = "v2"
    await asyncio.sleep(0.2)  # more than 2 TTLs: too stale to serve
    assert await cache.get("k", load) == "v2"


async def test_invalidate_and_errors() -> None:
    cache: AsyncTTLCache[str] = AsyncTTLCache(ttl_s=60)
    load = Loader()
    await cache.get("k", load)
    load.value = "v2"
    assert await cache.get("k", load) == "v1"
    cache.invalidate("k")
    assert await cache.get("k", load) == "v2"
    load.fail = True
    with pytest.raises(KeyError):
        await cache.get("other", load)
    load.fail = False
    assert await cache.get("other", load) == "v2"  # errors are not cached
