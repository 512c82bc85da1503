"""What the lifespan builds and every request uses; one instance per app (``app.state.tg``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.auth import KeyStore
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.quotas import Quotas
from gateway.resolver import Resolver
from gateway.routing import Router
from gateway.settings import GatewaySettings
from gateway.traffic_sampler import Sampler
from gateway.upstream import Upstream
from shared.db import Database
from shared.registry import Registry, ResolvedModel
from shared.replicas import ReplicaStore

if TYPE_CHECKING:
    from gateway.promotion import PromotionRouting
    from shared.tracing import Tracing

log = logging.getLogger("tunegate.gateway")


@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: Metrics
    db: Database
    keys: KeyStore
    registry: Registry
    resolver: Resolver
    upstream: Upstream
    router: Router
    quotas: Quotas
    redis: Any | None
    sampler: Sampler  # traffic sampling (gateway.traffic_sampler); records shadow answers too
    replicas: ReplicaStore  # engines registered through the admin API (shared.replicas)
    # Canary routing and shadow mirroring; installed by gateway.routers.admin_promotion's lifespan.
    promotions: PromotionRouting | None = None
    tracing: Tracing | None = None  # OpenTelemetry, when OTEL_* configures it (gateway.tracing)

    @classmethod
    async def open(cls, settings: GatewaySettings, metrics: Metrics) -> GatewayState:
        db = Database(settings.db_url)
        replicas = ReplicaStore(db)
        registry = Registry.from_settings(db, settings)
        upstream = Upstream(connect_timeout_s=settings.connect_timeout_s,
                            request_timeout_s=settings.request_timeout_s,
                            max_connections=settings.max_connections,
                            api_key=settings.engine_api_key.get_secret_value()
                            if settings.engine_api_key else None)
        router = Router(settings.engines, upstream, metrics,
                        health_interval_s=settings.health_interval_s,
                        load_timeout_s=settings.load_timeout_s,
                        max_adapters=settings.max_adapters_per_replica,
                        base_model_name=settings.base_model_name,
                        targets=registry.alias_targets, unload_idle_s=settings.unload_idle_s,
                        local_path=None if registry.store.is_local else _materializer(
                            registry, settings.adapter_cache_dir or
                            settings.data_dir / "adapter-cache"),
                        registered=replicas.urls)
        redis = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            redis = aioredis.Redis.from_url(
                settings.redis_url, socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s)
            # Shared with the other gateway processes: adapter placement, replicas down. The
            # channel's client has no read timeout (it waits for messages).
            router.placement = Placement(
                redis, subscriber=aioredis.Redis.from_url(
                    settings.redis_url, socket_connect_timeout=settings.redis_timeout_s),
                claim_ttl_s=settings.load_timeout_s + 10,
                done_ttl_s=max(10.0, 5 * settings.health_interval_s))
        else:
            log.warning("no REDIS_URL: quotas are not enforced")
        quotas = Quotas(redis, metrics, timeout_s=settings.redis_timeout_s,
                        retry_after_s=settings.redis_retry_after_s,
                        fail_open=settings.quota_fail_open)
        state = cls(settings=settings, metrics=metrics, db=db,
                    keys=KeyStore(db, settings.cache_ttl_s), registry=registry,
                    resolver=Resolver(registry, settings.cache_ttl_s), upstream=upstream,
                    router=router, quotas=quotas, redis=redis,
                    sampler=Sampler(settings, metrics, redis), replicas=replicas)
        await router.start()
        await quotas.start()
        await state.sampler.start()
        return state

    async def close(self) -> None:
        await self.sampler.stop()
        await self.quotas.stop()
        await self.router.stop()
        await self.upstream.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        self.db.dispose()


def _materializer(registry: Registry, cache_dir: Path) -> Callable[[ResolvedModel], str]:
    """Remote artifact store: a version is downloaded once into ``cache_dir`` (which engines must
    see at the same path: the same host or a shared volume) and engines load it from there."""
    def local_path(resolved: ResolvedModel) -> str:
        return str(registry.materialize(resolved.ref, cache_dir))
    return local_path
