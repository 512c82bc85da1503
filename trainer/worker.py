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
import time
from pathlib import Path
from typing import Any

from shared.db import Database
from shared.job_queue import JOB_FUNCTION
from shared.job_records import ACTIVE, JobStore, worker_lost_error
from shared.job_spec import TrainSpec
from shared.queue import arq_options, redis_settings
from shared.tracing import setup_tracing
from trainer.metrics import WorkerMetrics
from trainer.settings import TrainerSettings
from trainer.tracing import job_span, note

log = logging.getLogger(__name__)


async def train_adapter(ctx: dict[str, Any], spec_data: dict[str, Any]) -> dict[str, Any]:
    from trainer.backends import GpuOptions
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
    eval_engine = settings.eval_engine or None
    if eval_engine == "registered":
        from trainer.engine_eval import registered_engine

        eval_engine = registered_engine(ctx["db"])
    work_dir = settings.jobs_dir / spec.job_id
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    metrics: WorkerMetrics | None = ctx.get("metrics")
    status = "cancelled"
    with job_span(ctx.get("tracing"), spec.job_id, spec.name, spec.effective_base_name,
                  spec.traceparent) as trace:
        if metrics is not None:
            metrics.job_started()
        future = loop.run_in_executor(
            None,
            lambda: run_job(spec, store=store, registry=ctx.get("registry"), work_dir=work_dir,
                            cancel=cancel, progress_interval_s=settings.progress_interval_s,
                            price_per_device_hour=settings.price_per_device_hour,
                            eval_engine=eval_engine, trace=trace, metrics=metrics,
                            gpu=GpuOptions(settings.gradient_checkpointing, settings.optimizer,
                                           settings.input_embeddings, settings.compile_layers,
                                           settings.memory_target_gib),
                            files_dir=Path(settings.data_dir) / "files"),
        )
        try:
            outcome = await asyncio.shield(future)
            status = outcome.status
            from trainer.memory import release

            release()  # the job's model and optimizer: unreachable now, handed back to the system
            if trace is not None:
                note(trace.span, **{"job.status": outcome.status,
                                    "fine_tuned_model": outcome.fine_tuned_model})
        except asyncio.CancelledError:
            # arq aborted the job (or its timeout hit): stop at the next step, then report.
            if time.monotonic() - started >= settings.job_timeout_s - 1:
                cancel.reason = "timeout"
            cancel.set()
            await asyncio.wait([future])
            raise
        finally:
            if metrics is not None:
                metrics.job_finished(status, time.monotonic() - started)
    return {"status": outcome.status, "fine_tuned_model": outcome.fine_tuned_model,
            "error": outcome.error}


def preload_backend(backend: str) -> str | None:
    """Import the GPU backend at worker start, not in the first job: Unsloth's import (about
    15 s on the H200) was the larger half of a seed job's validation phase. Only where Unsloth
    is installed (so a CPU worker imports nothing heavy) and the backend may be Unsloth; returns
    the backend's name, or None when nothing was loaded."""
    import importlib.util

    if backend not in ("auto", "unsloth") or importlib.util.find_spec("unsloth") is None:
        return None
    from trainer.backends import select_backend

    return select_backend(backend).name


async def startup(ctx: dict[str, Any]) -> None:
    settings: TrainerSettings = ctx["settings"]
    preloaded = preload_backend(settings.backend)  # before anything imports transformers
    if preloaded:
        log.info("training backend %s loaded", preloaded)
    db = Database.from_settings(settings)
    ctx["db"] = db
    ctx["store"] = store = JobStore(db)
    if settings.register_adapters:
        from shared.registry import Registry

        ctx["registry"] = Registry.from_settings(db, settings)
    sweep(store, settings.stale_after_s)
    ctx["sweeper"] = asyncio.create_task(_sweep_forever(store, settings.stale_after_s))
    ctx["tracing"] = setup_tracing("tunegate-trainer")  # None unless OTEL_* configures it
    metrics = None
    if settings.metrics_port:
        metrics = ctx["metrics"] = WorkerMetrics(settings.queue_name)
        metrics.seed_eval_scores(store.list_jobs(limit=200))
        metrics.serve(settings.metrics_host, settings.metrics_port)
        if ctx.get("redis") is not None:
            ctx["metrics_refresher"] = asyncio.create_task(metrics.refresh_forever(
                ctx["redis"], store.count_by_status, settings.metrics_refresh_s))
    if settings.ingest_traffic and ctx.get("redis") is not None:
        # Sampled traffic, Redis stream -> SQL, next to the jobs (trainer.traffic_ingest).
        from trainer.traffic_ingest import Ingester, ingest_forever

        ingester = Ingester(ctx["redis"], db, stream=settings.traffic_stream)
        on_result = None
        if metrics is not None:
            m = metrics

            def on_result(r: Any) -> None:
                lag = time.time() - r.oldest_ms / 1000 if r.oldest_ms is not None else 0.0
                m.ingest(r.stored, r.duplicates, r.bad, lag)

        ctx["ingester"] = asyncio.create_task(ingest_forever(
            ingester, settings.ingest_interval_s, on_result))


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
    for name in ("sweeper", "ingester", "metrics_refresher"):
        task = ctx.get(name)
        if task is not None:
            task.cancel()
    if ctx.get("metrics") is not None:
        ctx["metrics"].close()
    if ctx.get("tracing") is not None:
        ctx["tracing"].shutdown()
    db = ctx.get("db")
    if db is not None:
        db.dispose()


def worker_settings(settings: TrainerSettings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (what arq calls ``WorkerSettings``)."""
    from arq.worker import func

    return {
        "functions": [func(train_adapter, name=JOB_FUNCTION, timeout=settings.job_timeout_s)],
        "redis_settings": redis_settings(settings.redis_url),
        **arq_options(),  # JSON, never pickle: Redis access must not mean code execution
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
