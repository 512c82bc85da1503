"""The arq worker: runs training jobs from Redis, one at a time.

- Job timeout: ``TrainerSettings.job_timeout_s`` (6 h by default: a CPU run of 1,000 examples
  takes ~10 min; a GPU seed workload ~5 min; this leaves room for big files).
- Cancellation: arq's abort (``allow_abort_jobs=True``) cancels the job's asyncio task; the task
  then sets the pipeline's cancel flag, waits for the training thread to stop at its next step,
  and the job ends ``cancelled`` with nothing registered.
- A worker killed mid-job: the job is **failed, not retried** (retrying a long job silently is
  worse than a clear failure the user can resubmit). Two paths make sure of it: a worker starting
  up fails every ``running`` job whose heartbeat is older than ``stale_after_s``, and when arq
  itself re-delivers the job (after its in-progress key expires, ``job_try > 1``) the job is
  failed instead of run. The killed run's adapter was only ever in its private work folder,
  never in the registry.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from arq import ArqRedis
from arq.connections import RedisSettings
from arq.constants import abort_jobs_ss
from arq.jobs import Job

from shared.db import Database, DatabaseSettings
from trainer.records import ACTIVE, JobStore, worker_lost_error
from trainer.settings import TrainerSettings
from trainer.spec import TrainSpec

JOB_FUNCTION = "train_adapter"
log = logging.getLogger(__name__)


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


async def train_adapter(ctx: dict[str, Any], spec_data: dict[str, Any]) -> dict[str, Any]:
    from trainer.jobs import CancelFlag, run_job

    settings: TrainerSettings = ctx["settings"]
    store: JobStore = ctx["store"]
    spec = TrainSpec.model_validate(spec_data)
    record = store.get(spec.job_id)
    if record is None:
        store.create(spec.job_id, model=spec.effective_base_name, name=spec.name,
                     spec=spec.model_dump(), status="queued")
    elif record["status"] not in ACTIVE:
        return {"status": record["status"], "skipped": True}
    if ctx.get("job_try", 1) > 1:
        # Re-delivered by arq: the worker that ran it died. Documented choice: fail, not retry.
        if store.set_status(spec.job_id, "failed", error=worker_lost_error()):
            store.add_event(spec.job_id, "worker lost mid-job; the job failed and was not retried",
                            level="error", heartbeat=False)
        return {"status": "failed", "error": "worker_lost"}

    cancel = CancelFlag()
    work_dir = settings.jobs_dir / spec.job_id
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(
        None,
        lambda: run_job(spec, store=store, registry=ctx.get("registry"), work_dir=work_dir,
                        cancel=cancel, progress_interval_s=settings.progress_interval_s,
                        files_dir=Path(settings.data_dir) / "files"),
    )
    try:
        outcome = await asyncio.shield(future)
        from trainer.memory import release

        release()  # the job's model and optimizer: unreachable now, handed back to the system
    except asyncio.CancelledError:
        # arq aborted the job (or its timeout hit): stop at the next step, then report.
        if time.monotonic() - started >= settings.job_timeout_s - 1:
            cancel.reason = "timeout"
        cancel.set()
        await asyncio.wait([future])
        raise
    return {"status": outcome.status, "fine_tuned_model": outcome.fine_tuned_model,
            "error": outcome.error}


async def startup(ctx: dict[str, Any]) -> None:
    settings: TrainerSettings = ctx["settings"]
    db = Database.from_settings(DatabaseSettings(data_dir=settings.data_dir))
    ctx["db"] = db
    ctx["store"] = store = JobStore(db)
    if settings.register_adapters:
        from shared.registry import Registry, StoreSettings

        # fsspec options (an S3 endpoint, ...) from TUNEGATE_ARTIFACT_STORE_OPTIONS.
        ctx["registry"] = Registry(db, settings.store_url,
                                   storage_options=StoreSettings().artifact_store_options)
    sweep(store, settings.stale_after_s)
    ctx["sweeper"] = asyncio.create_task(_sweep_forever(store, settings.stale_after_s))
    if settings.ingest_traffic and ctx.get("redis") is not None:
        # Sampled traffic, Redis stream -> SQL, next to the jobs (trainer.traffic).
        from trainer.traffic import Ingester, ingest_forever

        ingester = Ingester(ctx["redis"], db, stream=settings.traffic_stream)
        ctx["ingester"] = asyncio.create_task(ingest_forever(ingester, settings.ingest_interval_s))


def sweep(store: JobStore, stale_after_s: float) -> None:
    lost = store.fail_stale(stale_after_s)
    if lost:
        log.warning("failed %d job(s) whose worker died: %s", len(lost), ", ".join(lost))


async def _sweep_forever(store: JobStore, stale_after_s: float) -> None:
    # A background task, not an arq cron job: those would wait for the (single) job slot.
    while True:
        await asyncio.sleep(max(5.0, stale_after_s / 4))
        try:
            await asyncio.to_thread(sweep, store, stale_after_s)
        except Exception:
            log.exception("stale job sweep failed")


async def shutdown(ctx: dict[str, Any]) -> None:
    for name in ("sweeper", "ingester"):
        task = ctx.get(name)
        if task is not None:
            task.cancel()
    db = ctx.get("db")
    if db is not None:
        db.dispose()


def worker_settings(settings: TrainerSettings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (what arq calls ``WorkerSettings``)."""
    from arq.worker import func

    return {
        "functions": [func(train_adapter, name=JOB_FUNCTION, timeout=settings.job_timeout_s)],
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "allow_abort_jobs": True,
        "max_jobs": settings.max_jobs,
        "job_timeout": settings.job_timeout_s,
        "keep_result": 24 * 3600,  # seconds; results are also in the job record
        "poll_delay": 0.5,  # seconds between queue polls and abort checks
        "max_tries": 2,  # a second delivery only happens when a worker died: it fails the job
    }


def create_worker(settings: TrainerSettings, **overrides: Any) -> Any:
    from arq import Worker

    return Worker(**{**worker_settings(settings), **overrides})


async def enqueue_training(pool: ArqRedis, spec: TrainSpec, *, queue_name: str) -> Job | None:
    """Queue a job (its record must exist); the arq job id is the job's id."""
    return await pool.enqueue_job(JOB_FUNCTION, spec.model_dump(), _job_id=spec.job_id,
                                  _queue_name=queue_name)


async def cancel_training(pool: ArqRedis, store: JobStore, job_id: str) -> None:
    """Cancel a job: a queued one at once; a running one through arq's abort (the worker stops
    at the next training step and writes ``cancelled``)."""
    record = store.get(job_id)
    if record is None or record["status"] not in ACTIVE:
        return
    if store.set_status(job_id, "cancelled", only_from=frozenset({"validating_files", "queued"})):
        store.add_event(job_id, "Job cancelled before it started", heartbeat=False)
    # What arq's Job.abort does, without waiting for the result.
    await pool.zadd(abort_jobs_ss, {job_id: int(time.time() * 1000)})
