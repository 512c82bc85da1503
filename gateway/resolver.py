"""Model-name resolution with a short per-process cache over the registry (SQL).

A hit costs a dict lookup; misses and refreshes run the registry query in a worker thread, one
per name at a time (``gateway.cache``). Unknown names are cached too (bounded); names that do
not parse are refused before the cache and never stored in it. ``invalidate()``
is called by the admin API after registrations and alias moves, so the changing process sees them
at once; other processes within ``2 * ttl_s`` seconds.
"""

from __future__ import annotations

from gateway.cache import AsyncTTLCache
from shared.errors import ModelNotFound
from shared.registry import BASE, Registry, ResolvedModel, parse_model_name


class Resolver:
    def __init__(self, registry: Registry, ttl_s: float) -> None:
        self.registry = registry
        self.cache: AsyncTTLCache[ResolvedModel | None] = AsyncTTLCache(ttl_s)

    def _lookup(self, model: str) -> ResolvedModel | None:
        try:
            return self.registry.resolve(model)
        except ModelNotFound:
            return None

    async def resolve(self, model: str) -> ResolvedModel:
        if model != BASE:
            parse_model_name(model)  # ModelNotFound for junk, which is not worth a cache entry
        found = await self.cache.get(model, lambda: self._lookup(model))
        if found is None:
            raise ModelNotFound(model)
        return found

    def invalidate(self) -> None:
        self.cache.invalidate()
