"""Gateway settings (``TUNEGATE_GATEWAY_*``), plus the few shared ones read under their own names:
``TUNEGATE_DATA_DIR``, ``TUNEGATE_DATABASE_URL``, ``TUNEGATE_ARTIFACT_STORE`` and ``REDIS_URL``
(``TUNEGATE_GATEWAY_REDIS_URL`` wins over ``REDIS_URL``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.db import database_url
from shared.settings import CommonSettings
from shared.traffic import STREAM


def _data_dir() -> Path:
    return CommonSettings().data_dir


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEGATE_GATEWAY_", extra="ignore",
                                      populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    # Engine replicas: base URLs, comma-separated in the environment.
    engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [
        "http://127.0.0.1:8001"])
    data_dir: Path = Field(default_factory=_data_dir,
                           validation_alias=AliasChoices("data_dir", "TUNEGATE_DATA_DIR"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("database_url", "TUNEGATE_DATABASE_URL"))
    artifact_store: str | None = Field(  # local path or fsspec URL; default <data_dir>/artifacts
        default=None, validation_alias=AliasChoices("artifact_store", "TUNEGATE_ARTIFACT_STORE"))
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices(
        "redis_url", "TUNEGATE_GATEWAY_REDIS_URL", "REDIS_URL"))

    # Routing and upstreams.
    health_interval_s: float = 2.0  # active GET /health on every replica, seconds
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0  # whole upstream request, seconds (generation can be long)
    load_timeout_s: float = 120.0  # POST /v1/load_lora_adapter, seconds
    max_connections: int = 1000  # httpx pool size over all replicas
    max_adapters_per_replica: int = 8  # least recently used one is unloaded beyond this
    base_model_name: str | None = None  # the engines' id for the base; None: read from /v1/models
    # A version no alias points at is unloaded from a replica after this long unused, seconds.
    unload_idle_s: float = 10.0
    # With a remote artifact store (s3://...), versions are downloaded here before an engine is
    # asked to load them; engines must see this folder at the same path (same host, or a shared
    # volume). None: ``<data_dir>/adapter-cache``.
    adapter_cache_dir: Path | None = None

    # Caches (seconds): key lookups and model resolution; a revoked key or a moved alias takes
    # effect in other gateway processes within twice this (at once in the process that changed it).
    cache_ttl_s: float = 2.0

    # Quotas.
    redis_timeout_s: float = 0.25  # per Redis call on the request path, seconds
    redis_retry_after_s: float = 1.0  # after a Redis failure, skip Redis this long (fail open)

    # Traffic sampling (gateway.sampling). Rates are shares of requests, 0..1. A key's own
    # ``sample_rate`` (admin API, ``tunegate keys``) wins over the per-model one, which wins over
    # the default; 0 never samples. Per model: JSON ``{"base": 0.05, "sentiment": 0.2}`` by
    # adapter name.
    sample_rate: float = Field(default=0.01, ge=0, le=1)
    sample_rate_by_model: dict[str, float] = Field(default_factory=dict)
    sample_stream: str = Field(  # the Redis stream the worker ingests (same name on both sides)
        default=STREAM, validation_alias=AliasChoices(
            "sample_stream", "TUNEGATE_GATEWAY_SAMPLE_STREAM", "TUNEGATE_TRAFFIC_STREAM"))
    sample_stream_maxlen: int = Field(default=100_000, ge=100)  # entries, trimmed approximately
    sample_buffer: int = Field(default=10_000, ge=1)  # records waiting for Redis; more are dropped
    sample_flush_s: float = Field(default=0.05, gt=0)  # seconds records are batched before XADD
    # Masks e-mail addresses, phone and card numbers in sampled text: "default", "off", or a
    # dotted path ("pkg.module.func" or "pkg.module:func") to a ``str -> str`` callable.
    sample_scrubber: str = "default"

    # Promotion (gateway.promotion): shadow copies of bare-NAME requests in flight at once (more
    # are dropped and counted), and the quality gauge's refresh from SQL and age limit, seconds.
    max_shadow_in_flight: int = Field(default=4, ge=1)
    quality_refresh_s: float = Field(default=15.0, gt=0)
    console_session_ttl_s: float = Field(
        default=8 * 3600.0, gt=0,
        description="how long a console sign-in lasts, seconds (the cookie's max age)")
    quality_max_age_s: float = Field(default=3600.0, gt=0)

    log_level: str = "info"

    @field_validator("engines", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [u.strip().rstrip("/") for u in v.split(",") if u.strip()]
        if isinstance(v, list):
            return [str(u).rstrip("/") for u in v]
        return v

    @field_validator("sample_rate_by_model")
    @classmethod
    def _rates(cls, v: dict[str, float]) -> dict[str, float]:
        for name, rate in v.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"sample rate of {name!r} must be between 0 and 1")
        return v

    @property
    def db_url(self) -> str:
        return database_url(self.data_dir, self.database_url)

    @property
    def store(self) -> str:
        return self.artifact_store or str(self.data_dir / "artifacts")
