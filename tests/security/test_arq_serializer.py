"""arq never unpickles: a pickle planted in Redis (what anyone with write access to it could do)
is not run by the trainer's or the monitor's worker, while JSON jobs through the same pools work.
Real Redis, real arq workers."""

from __future__ import annotations

import asyncio
import os
import pickle
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from arq.constants import job_key_prefix
from arq.worker import func

from shared.queue import arq_options, job_deserializer, redis_settings
from trainer.schedule import MonitorSettings, create_monitor_worker, monitor_worker_settings
from trainer.settings import TrainerSettings
from trainer.worker import create_worker


class Planted:
    """Unpickling this creates a file: proof that a worker ran attacker-chosen code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


async def echo(ctx: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    return {"echo": value}


async def plant(redis_url: str, queue: str, marker: Path) -> str:
    pool = await create_pool(redis_settings(redis_url), **arq_options())
    try:
        job_id = "planted-" + secrets.token_hex(4)
        payload = pickle.dumps({"t": 1, "f": "echo", "a": (Planted(marker),), "k": {},
                                "et": int(time.time() * 1000)})
        await pool.set(job_key_prefix + job_id, payload, px=60_000)
        await pool.zadd(queue, {job_id: int(time.time() * 1000)})
        return job_id
    finally:
        await pool.aclose()


async def run_worker(worker: Any, seconds: float) -> None:
    task = asyncio.create_task(worker.async_run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await worker.close()


def test_trainer_worker_runs_json_jobs_and_never_unpickles(tmp_path: Path,
                                                          redis_url: str) -> None:
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    settings = TrainerSettings(redis_url=redis_url, data_dir=tmp_path, queue_name=queue,
                               ingest_traffic=False)
    marker = tmp_path / "pwned"

    async def main() -> Any:
        job_id = await plant(redis_url, queue, marker)
        pool = await create_pool(redis_settings(redis_url), **arq_options())
        try:
            good = await pool.enqueue_job("echo", {"n": 1}, _queue_name=queue)
            assert good is not None
            worker = create_worker(settings, handle_signals=False,
                                   functions=[func(echo, name="echo")])
            await run_worker(worker, 3.0)
            raw = await pool.get(job_key_prefix + good.job_id)
            assert raw is None or job_deserializer(raw)  # stored as JSON, when still there
            result = await good.result(timeout=5)
            planted = await pool.get(job_key_prefix + job_id)
            return result, planted
        finally:
            await pool.aclose()

    result, _ = asyncio.run(main())
    assert result == {"echo": {"n": 1}}
    assert not marker.exists(), "the worker unpickled a job planted in Redis"


def test_monitor_worker_never_unpickles(tmp_path: Path, redis_url: str) -> None:
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    settings = TrainerSettings(redis_url=redis_url, data_dir=tmp_path, ingest_traffic=False)
    options = monitor_worker_settings(settings, MonitorSettings(queue_name=queue))
    assert options["job_deserializer"] is job_deserializer
    marker = tmp_path / "pwned"

    async def main() -> None:
        await plant(redis_url, queue, marker)
        worker = create_monitor_worker(
            TrainerSettings(redis_url=redis_url, data_dir=tmp_path, ingest_traffic=False),
            MonitorSettings(queue_name=queue), functions=[func(echo, name="echo")],
            cron_jobs=[])
        await run_worker(worker, 3.0)

    asyncio.run(main())
    assert not marker.exists(), "the monitor worker unpickled a job planted in Redis"
