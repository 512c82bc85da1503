"""The evaluation jobs on arq: a second worker, on its own queue, with cron schedules.

Training jobs hold the training worker's single job slot for minutes to hours; a quality check
or a canary rollback must not wait behind them. So ``tunegate trainer worker`` runs two arq
workers on one event loop: the training worker (``trainer.worker``) and this monitor worker
(queue ``TUNEGATE_MONITOR_QUEUE_NAME``, a few jobs at a time). Its cron jobs:

====================  ==========================================  ==============================
job                   what                                        every (seconds, setting)
====================  ==========================================  ==============================
``quality_monitor``   ``trainer.monitor.run_quality``             ``quality_interval_s`` (60)
``shadow_evaluation`` ``trainer.monitor.run_shadow``              ``shadow_interval_s`` (120)
``promotion_tick``    ``trainer.monitor.run_tick``                ``tick_interval_s`` (30)
====================  ==========================================  ==============================

arq cron jobs fire on wall-clock marks, so an interval must divide 60 (seconds) or be whole
minutes dividing 60; 0 disables a schedule. Tests (and operators) may also enqueue a job by
name on the queue: it runs at once (:func:`enqueue`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.queue import arq_options, redis_settings
from shared.settings import LOCAL_KEY_FILE
from shared.tracing import setup_tracing
from trainer.settings import TrainerSettings
from trainer.tracing import run_span

JOBS = ("quality_monitor", "shadow_evaluation", "promotion_tick")


class MonitorSettings(BaseSettings):
    """``TUNEGATE_MONITOR_*``."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_MONITOR_", extra="ignore",
                                      populate_by_name=True)

    enabled: bool = True  # False: `tunegate trainer worker` runs training jobs only
    queue_name: str = "tunegate:monitor"
    quality_interval_s: int = 60
    shadow_interval_s: int = 120
    tick_interval_s: int = 30
    window_s: float = 3600.0  # sampled traffic the quality monitor looks at, seconds back
    max_rows: int = 5000  # rows per version and run (newest first)
    shadow_samples: int = 50  # stable-lane prompts replayed per shadow evaluation
    # A candidate is replayed again only when its newest shadow evaluation is older than this
    # (seconds): replays load the engines like live traffic does.
    shadow_rerun_s: float = 1800.0
    # Replays go through the gateway like any client: its URL and an API key (None: the local
    # admin key `tunegate up` writes, $TUNEGATE_DATA_DIR/local-admin.key).
    gateway_url: str = Field(default="http://127.0.0.1:8000", validation_alias=AliasChoices(
        "gateway_url", "TUNEGATE_MONITOR_GATEWAY_URL"))
    api_key: str | None = None
    replay_concurrency: int = 2
    replay_timeout_s: float = 120.0
    job_timeout_s: int = 600


def cron_times(interval_s: int) -> dict[str, Any] | None:
    """arq ``cron`` keyword arguments firing every ``interval_s`` seconds (see the docstring)."""
    if interval_s <= 0:
        return None
    if interval_s < 60:
        if 60 % interval_s:
            raise ValueError(f"an interval under a minute must divide 60: {interval_s}")
        return {"second": set(range(0, 60, interval_s))}
    if interval_s % 60 or 60 % (interval_s // 60):
        raise ValueError(f"an interval over a minute must be whole minutes dividing 60: "
                         f"{interval_s}")
    return {"minute": set(range(0, 60, interval_s // 60)), "second": 0}


async def _alone(ctx: dict[str, Any], job: str,
                 run: Callable[[], Awaitable[list[dict[str, Any]]]]) -> list[dict[str, Any]] | str:
    """``run()``, unless the previous run of ``job`` is still going: a run that outlasts its
    interval (a long replay) makes the next one skip, not pile up."""
    locks: dict[str, asyncio.Lock] = ctx.setdefault("monitor_locks", {})
    lock = locks.setdefault(job, asyncio.Lock())
    if lock.locked():
        return "skipped: the previous run is still going"
    async with lock:
        return await run()


async def quality_monitor(ctx: dict[str, Any]) -> list[dict[str, Any]] | str:
    from trainer.monitor import run_quality

    async def run() -> list[dict[str, Any]]:
        with run_span(ctx.get("tracing"), "quality monitor"):
            return await asyncio.to_thread(run_quality, ctx["monitor"])

    return await _alone(ctx, "quality_monitor", run)


async def shadow_evaluation(ctx: dict[str, Any]) -> list[dict[str, Any]] | str:
    from trainer.monitor import run_shadow

    async def run() -> list[dict[str, Any]]:
        with run_span(ctx.get("tracing"), "shadow evaluation"):
            return await run_shadow(ctx["monitor"])

    return await _alone(ctx, "shadow_evaluation", run)


async def promotion_tick(ctx: dict[str, Any]) -> list[dict[str, Any]] | str:
    from trainer.monitor import run_tick

    return await _alone(ctx, "promotion_tick", lambda: run_tick(ctx["monitor"]))


def _api_key(settings: MonitorSettings, data_dir: Path) -> str | None:
    if settings.api_key:
        return settings.api_key
    path = data_dir / LOCAL_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


async def startup(ctx: dict[str, Any]) -> None:
    from shared.db import Database
    from shared.promotion import Promotions
    from shared.registry import Registry
    from trainer.monitor import MonitorContext

    trainer: TrainerSettings = ctx["settings"]
    ms: MonitorSettings = ctx["monitor_settings"]
    db = Database.from_settings(trainer)
    ctx["tracing"] = setup_tracing("tunegate-trainer")  # None unless OTEL_* configures it
    registry = Registry.from_settings(db, trainer)
    ctx["monitor"] = MonitorContext(
        db=db, registry=registry, promotions=Promotions(db, registry), redis=ctx.get("redis"),
        gateway_url=ms.gateway_url, api_key=_api_key(ms, trainer.data_dir),
        window_s=ms.window_s, max_rows=ms.max_rows, shadow_samples=ms.shadow_samples,
        shadow_rerun_s=ms.shadow_rerun_s,
        replay_concurrency=ms.replay_concurrency, replay_timeout_s=ms.replay_timeout_s)
    if ctx.get("ingest_traffic") and ctx.get("redis") is not None:
        # A monitor running without a training worker (``--role monitor``) moves the sampled
        # traffic into SQL itself, so a trainer scaled to zero does not stop ingestion.
        from trainer.traffic_ingest import Ingester, ingest_forever

        ingester = Ingester(ctx["redis"], db, stream=trainer.traffic_stream)
        ctx["ingester"] = asyncio.create_task(ingest_forever(ingester, trainer.ingest_interval_s))


async def shutdown(ctx: dict[str, Any]) -> None:
    ingester = ctx.get("ingester")
    if ingester is not None:
        ingester.cancel()
    mc = ctx.get("monitor")
    if mc is not None:
        mc.db.dispose()
    if ctx.get("tracing") is not None:
        ctx["tracing"].shutdown()


def monitor_worker_settings(settings: TrainerSettings, monitor: MonitorSettings | None = None,
                            *, ingest_traffic: bool = False) -> dict[str, Any]:
    """Keyword arguments for the monitor's ``arq.Worker``; ``ingest_traffic``: it also moves
    sampled traffic into SQL (when no training worker runs beside it)."""
    from arq.cron import cron
    from arq.worker import func

    ms = monitor or MonitorSettings()
    fns = {"quality_monitor": quality_monitor, "shadow_evaluation": shadow_evaluation,
           "promotion_tick": promotion_tick}
    intervals = {"quality_monitor": ms.quality_interval_s,
                 "shadow_evaluation": ms.shadow_interval_s,
                 "promotion_tick": ms.tick_interval_s}
    crons = []
    for name, fn in fns.items():
        times = cron_times(intervals[name])
        if times is not None:
            crons.append(cron(fn, name=f"cron:{name}", timeout=ms.job_timeout_s, **times))
    return {
        "functions": [func(fn, name=name, timeout=ms.job_timeout_s) for name, fn in fns.items()],
        "cron_jobs": crons,
        "redis_settings": redis_settings(settings.redis_url),
        **arq_options(),  # JSON, never pickle
        "queue_name": ms.queue_name,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings, "monitor_settings": ms, "ingest_traffic": ingest_traffic},
        "max_jobs": 4,  # one of each job kind, plus a job enqueued by hand
        "job_timeout": ms.job_timeout_s,
        "keep_result": 3600,  # seconds
        "poll_delay": 0.5,  # seconds
        "max_tries": 1,  # the next schedule is the retry
    }


def create_monitor_worker(settings: TrainerSettings, monitor: MonitorSettings | None = None,
                          **overrides: Any) -> Any:
    from arq import Worker

    return Worker(**{**monitor_worker_settings(settings, monitor), "handle_signals": False,
                     **overrides})


def run_with_monitor(main: Any, monitor: Any | None) -> None:
    """Run the training worker ``main`` (blocking, it handles SIGINT/SIGTERM) with ``monitor``
    on the same event loop; a signal stops both."""
    if monitor is None:
        main.run()
        return
    loop = main.loop
    monitor.main_task = loop.create_task(monitor.main())
    main.on_stop = lambda sig: monitor.handle_sig(sig)
    try:
        main.run()
    finally:
        monitor.handle_sig(signal.SIGTERM)
        loop.run_until_complete(asyncio.gather(monitor.main_task, return_exceptions=True))
        loop.run_until_complete(monitor.close())


async def enqueue(pool: Any, job: str, *, queue_name: str) -> Any:
    """Run one of :data:`JOBS` now (it returns a list of per-version results)."""
    if job not in JOBS:
        raise ValueError(f"unknown monitor job {job!r}: {', '.join(JOBS)}")
    return await pool.enqueue_job(job, _queue_name=queue_name)
