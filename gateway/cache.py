"""A small async TTL cache over blocking loaders (SQL lookups), for the request path.

- A miss runs the loader in a worker thread; concurrent misses of one key share that one load
  (single flight), so a burst of requests never turns into a burst of queries.
- An entry expired for less than another ``ttl_s`` is served as it is while one background
  refresh runs (stale while revalidate): under steady traffic no request waits on SQL. Older
  entries are loaded again before answering. So a change made elsewhere shows within
  ``2 * ttl_s``; ``invalidate`` makes it show at once in this process.
- At most ``max_entries`` entries; beyond that the cache is cleared (junk keys cannot grow it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from anyio import to_thread

V = TypeVar("V")


class AsyncTTLCache(Generic[V]):
    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, V]] = {}  # key -> (expires at, value)
        self._loading: dict[str, asyncio.Future[V]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str, load: Callable[[], V]) -> V:
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and now < entry[0] + self.ttl_s:
            if entry[0] <= now and key not in self._loading:
                task = asyncio.get_running_loop().create_task(self._refresh(key, load))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return entry[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        return await self._load(key, load)

    async def _load(self, key: str, load: Callable[[], V]) -> V:
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            value = await to_thread.run_sync(load)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: there may be no other waiter
            raise
        finally:
            self._loading.pop(key, None)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        fut.set_result(value)
        return value

    async def _refresh(self, key: str, load: Callable[[], V]) -> None:
        try:
            await self._load(key, load)
        except Exception:
            self._entries.pop(key, None)  # the next request loads (and sees the error) itself

    def invalidate(self, key: str | None = None) -> None:
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)
