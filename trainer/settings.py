"""What the trainer reads from the environment. Only this class reads it (the storage variables
and the queue name through the shared classes it extends)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from shared.job_queue import JobQueueSettings
from shared.settings import StorageSettings
from shared.traffic_records import STREAM


class TrainerSettings(StorageSettings, JobQueueSettings):
    """``TUNEGATE_TRAINER_*`` variables; ``REDIS_URL`` names the queue's Redis; storage
    (``TUNEGATE_DATA_DIR``, ...) from ``StorageSettings``."""

    model_config = SettingsConfigDict(
        env_prefix="TUNEGATE_TRAINER_", extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "TUNEGATE_TRAINER_REDIS_URL"),
    )
    # False: train and evaluate, never touch the registry (benchmarks).
    register_adapters: bool = True
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
    # (trainer.traffic_ingest); ingest_traffic=False leaves it to other workers.
    traffic_stream: str = Field(default=STREAM, validation_alias=AliasChoices(
        "TUNEGATE_TRAFFIC_STREAM", "TUNEGATE_TRAINER_TRAFFIC_STREAM", "traffic_stream"))
    ingest_traffic: bool = True
    ingest_interval_s: float = 1.0

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
