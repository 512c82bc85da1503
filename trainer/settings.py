"""What the trainer reads from the environment. Only this class reads it."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import CommonSettings
from shared.traffic import STREAM


class TrainerSettings(BaseSettings):
    """``TUNEGATE_TRAINER_*`` variables; ``REDIS_URL`` names the queue."""

    model_config = SettingsConfigDict(
        env_prefix="TUNEGATE_TRAINER_", extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "TUNEGATE_TRAINER_REDIS_URL"),
    )
    # Where registered adapters live (local path or fsspec URL), as the gateway reads it.
    artifact_store: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TUNEGATE_ARTIFACT_STORE", "TUNEGATE_TRAINER_ARTIFACT_STORE"),
    )
    # False: train and evaluate, never touch the registry (benchmarks).
    register_adapters: bool = True
    queue_name: str = "tunegate:trainer"
    data_dir: Path = Field(
        default_factory=lambda: CommonSettings().data_dir,
        validation_alias=AliasChoices("TUNEGATE_DATA_DIR", "TUNEGATE_TRAINER_DATA_DIR"),
    )
    # A training job may run for hours on CPU; arq cancels a job at this limit (seconds).
    job_timeout_s: int = 6 * 3600
    # One job at a time per worker: a job uses every core (CPU) or the whole GPU.
    max_jobs: int = 1
    # Progress events are written at most this often (seconds); the first and last step always.
    progress_interval_s: float = 2.0
    # A running job whose heartbeat (every 15 s while its worker lives) is older than this
    # (seconds) is failed by any worker, at its start and every stale_after_s / 4: its worker died.
    stale_after_s: float = 120.0
    backend: str = "auto"  # auto | cpu | unsloth | hf_qlora
    # Sampled traffic: the gateway's Redis stream, moved into SQL every ingest_interval_s seconds
    # (trainer.traffic); ingest_traffic=False leaves it to other workers.
    traffic_stream: str = Field(default=STREAM, validation_alias=AliasChoices(
        "TUNEGATE_TRAFFIC_STREAM", "TUNEGATE_TRAINER_TRAFFIC_STREAM", "traffic_stream"))
    ingest_traffic: bool = True
    ingest_interval_s: float = 1.0
    # Prometheus metrics of the worker (trainer.metrics) on http://metrics_host:metrics_port/;
    # 0 turns them off (the default: several workers on one host would collide on one port).
    metrics_port: int = Field(default=0, ge=0, le=65535,
                              description="port of the worker's /metrics; 0: off")
    metrics_host: str = Field(default="127.0.0.1", description="address /metrics listens on")
    metrics_refresh_s: float = Field(default=5.0, gt=0,
                                     description="queue and job-state gauges refresh, seconds")

    @property
    def store_url(self) -> str:
        return self.artifact_store or str(self.data_dir / "artifacts")

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
