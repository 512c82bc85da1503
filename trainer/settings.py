"""What the trainer reads from the environment. Only this class reads it (the storage variables
and the queue name through the shared classes it extends)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    # auto | cpu | unsloth | hf_qlora; auto or unsloth, where Unsloth is installed: the worker
    # imports it at start (trainer.worker.preload_backend), not in its first job.
    backend: str = "auto"
    # Unsloth's activation checkpoints: "offload" keeps them in host memory (the least GPU
    # memory, and the faster on an H200: Unsloth copies them back while the backward computes);
    # "device" keeps them on the GPU (about 0.8 GiB more per 4k tokens of micro-batch at 8B).
    gradient_checkpointing: Literal["offload", "device"] = "offload"
    # The GPU backends' optimizer: "adamw" is torch's fused AdamW (float32 states: 0.23 GiB more
    # than 8-bit for r 16 on every projection of an 8B model; a few kernel launches a step);
    # "adamw_8bit" is bitsandbytes' 8-bit AdamW (a kernel launch per tensor: 23 ms of a 370 ms
    # step at 8B on an H200). The CPU backend always uses torch's AdamW.
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    # Where the GPU backends keep the input embedding table while training (an untied one; a
    # table the output layer shares stays): "host" frees it from the GPU (0.98 GiB at 8B, as fast
    # on an H200) and gathers each micro-batch's rows on the host (trainer.backends.embeddings);
    # "device" keeps it on the GPU.
    input_embeddings: Literal["host", "device"] = "host"
    # Unsloth's torch.compile region per decoder layer: 1.3-2.5% faster steps on an H200 at 8B,
    # but the first step compiles (47 s more with cold caches); "auto" compiles jobs of 20M input
    # tokens or more (about half an hour there), "on" and "off" always and never.
    compile_layers: Literal["auto", "on", "off"] = "auto"
    # GPU memory (GiB) a GPU job may spend on speed: after its first step (the costliest batch),
    # as many decoder layers as fit under it keep their activations instead of recomputing them
    # in the backward (trainer.backends.keep_layers); 0 keeps none, every layer recomputes.
    memory_target_gib: float = Field(default=0.0, ge=0)
    # A job's estimated cost (trainer.cost): its device seconds times this price per hour of
    # the worker's device, in price_currency. 4.0 is an on-demand H200-class GPU hour's order of
    # magnitude; set what your device costs (0 reports seconds with no price).
    price_per_device_hour: float = Field(default=4.0, ge=0)
    # Where the gate evaluates (trainer.engine_eval): "" in the worker itself (transformers);
    # "registered": on an engine replica registered with the gateway (a vLLM one first), the
    # candidate loaded there under a name of its own; or an engine's URL. The engine must serve
    # the job's base model and read the worker's data folder; otherwise the worker evaluates.
    eval_engine: str = ""
    # Sampled traffic: the gateway's Redis stream, moved into SQL every ingest_interval_s seconds
    # (trainer.traffic_ingest); ingest_traffic=False leaves it to other workers.
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
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
