"""Gateway settings (``TUNEGATE_GATEWAY_*``), plus the shared ones read under their own names:
storage (``TUNEGATE_DATA_DIR``, ``TUNEGATE_DATABASE_URL``, ``TUNEGATE_ARTIFACT_STORE``, ...:
``shared.settings.StorageSettings``), the training queue's name (``shared.job_queue``) and
``REDIS_URL`` (``TUNEGATE_GATEWAY_REDIS_URL`` wins over ``REDIS_URL``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.job_queue import JobQueueSettings
from shared.settings import StorageSettings
from shared.traffic_records import STREAM


class GatewaySettings(StorageSettings, JobQueueSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEGATE_GATEWAY_", extra="ignore",
                                      populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    # Engine replicas: base URLs, comma-separated in the environment.
    engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [
        "http://127.0.0.1:8001"])
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices(
        "redis_url", "TUNEGATE_GATEWAY_REDIS_URL", "REDIS_URL"))

    engine_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices(
            "engine_api_key", "TUNEGATE_GATEWAY_ENGINE_API_KEY", "TUNEGATE_ENGINE_API_KEY"),
        description="The engines' shared secret (their --api-key), sent as a bearer token on "
        "every engine call: inference, health and model listing, adapter load and unload.")

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
    # Only a lost Redis connection (connection error, timeout) may skip quota checks; with this
    # off the gateway answers 503 instead (fail closed). Script or value errors never fail open.
    quota_fail_open: bool = Field(default=True, description=(
        "When Redis is unreachable, serve without quota checks (True) or refuse with 503 (False)."))

    # Cost caps (gateway.limits). Bodies are counted as they arrive; beyond the cap: 413.
    max_body_bytes: int = Field(default=2 * 2**20, ge=1024, description=(
        "Largest request body on every route but uploads, bytes."))
    max_upload_bytes: int = Field(default=512 * 2**20, ge=1024, description=(
        "Largest POST /v1/files body (admin keys only), bytes."))
    max_json_depth: int = Field(default=64, ge=4, description=(
        "Deepest nesting of arrays/objects accepted in a JSON body; deeper is a 400."))
    max_model_name_chars: int = Field(default=256, ge=16, description=(
        "Longest `model` name accepted, characters; longer is a 400 and never cached."))
    max_prompt_chars: int = Field(default=1_000_000, ge=1000, description=(
        "Largest prompt (all message contents, or all prompt strings/token ids), characters."))
    max_model_len: int = Field(default=8192, ge=16, description=(
        "Context length, tokens, when the engines do not report `max_model_len` in /v1/models."))

    # Operator choices for the unauthenticated surfaces. API docs (/docs, /redoc,
    # /openapi.json) are off by default; /metrics is "open" (Prometheus scrapes it; restrict at
    # the network), "admin" (an admin key as bearer token), or "off".
    api_docs: bool = Field(default=False, description=(
        "Serve /docs, /redoc and /openapi.json (without a key)."))
    metrics_access: Literal["open", "admin", "off"] = Field(default="open", description=(
        "Who may read /metrics: anyone, admin keys only, or nobody (404)."))

    # Traffic sampling (gateway.traffic_sampler). Rates are shares of requests, 0..1. A key's own
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

    allowed_scorers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Importable golden-set scorers (`pkg.module:attr`, comma-separated) that "
        "fine-tuning jobs may name; the worker imports them. Built-in scorers (exact, "
        "label_set:..., json_fields:...) are always allowed.")

    log_level: str = "info"

    @field_validator("allowed_scorers", mode="before")
    @classmethod
    def _split_scorers(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

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
