"""The arq worker on real Redis: a job runs to completion and is registered; an arq abort mid-run
ends the job ``cancelled`` with nothing registered; a running job whose worker died is failed by
the next worker to start."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from sqlalchemy import update

from shared.data import write_jsonl
from shared.db import Database
from shared.job_queue import cancel_training, enqueue_training, new_job_id
from shared.job_records import FineTuningJob, JobStore
from shared.job_spec import TrainSpec
from shared.queue import arq_options, redis_settings
from shared.registry import Registry
from shared.settings import StorageSettings
from trainer.data_sources import build_splits
from trainer.settings import TrainerSettings
from trainer.worker import create_worker, shutdown, startup


@pytest.fixture
async def system(
    tmp_path: Path, redis_url: str, default_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    settings = TrainerSettings(
        redis_url=redis_url, data_dir=tmp_path, progress_interval_s=0.0,
        queue_name=f"tunegate:test:{secrets.token_hex(4)}",  # never meets another worker's jobs
    )
    db = Database(StorageSettings(data_dir=tmp_path).db_url)
    train, golden = build_splits(n_train=120, n_golden=8, seed=0)
    pool = await create_pool(redis_settings(redis_url), **arq_options())
    worker = create_worker(settings, handle_signals=False)
    yield {
        "settings": settings, "store": JobStore(db), "db": db, "pool": pool, "worker": worker,
        "registry": Registry(db, settings.store_url), "base": default_model_dir,
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "golden": write_jsonl(tmp_path / "golden.jsonl", golden),
    }
    await worker.close()
    await pool.aclose()
    db.dispose()


def spec_for(system: dict[str, Any], **kw: Any) -> TrainSpec:
    spec = TrainSpec(
        job_id=new_job_id(), name="rt-worker", base_model=str(system["base"]),
        training_file=str(system["train"]), golden_file=str(system["golden"]),
        batch_size=4, threshold=0.0, eval_max_new_tokens=3, **kw,
    )
    system["store"].create(spec.job_id, model="SmolLM2-135M-Instruct", name=spec.name,
                           spec=spec.model_dump())
    return spec


async def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.2)


async def test_job_runs_to_completion(system: dict[str, Any]) -> None:
    run = asyncio.create_task(system["worker"].async_run())
    try:
        spec = spec_for(system, max_steps=2)
        job = await enqueue_training(system["pool"], spec, queue_name=system["settings"].queue_name)
        assert job is not None
        result = await job.result(timeout=600, poll_delay=0.5)
    finally:
        run.cancel()
    assert result["status"] == "succeeded", result
    record = system["store"].get(spec.job_id)
    assert record["status"] == "succeeded" and record["fine_tuned_model"] == "rt-worker@v1"
    assert system["registry"].resolve("rt-worker:stable").version == 1
    events = system["store"].events(spec.job_id)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == [1, 2]


async def test_abort_cancels_at_the_next_step_and_registers_nothing(system: dict[str, Any]) -> None:
    run = asyncio.create_task(system["worker"].async_run())
    store: JobStore = system["store"]
    try:
        spec = spec_for(system, max_steps=500)
        await enqueue_training(system["pool"], spec, queue_name=system["settings"].queue_name)
        await wait_for(lambda: any(e["type"] == "metrics" for e in store.events(spec.job_id)), 300)
        await cancel_training(system["pool"], store, spec.job_id)
        await wait_for(lambda: store.get(spec.job_id)["status"] != "running", 120)
    finally:
        run.cancel()
    record = store.get(spec.job_id)
    assert record["status"] == "cancelled"
    assert record["fine_tuned_model"] is None
    steps = [e["data"]["step"] for e in store.events(spec.job_id) if e["type"] == "metrics"]
    assert max(steps) < 500
    assert system["registry"].list_adapters() == []
    assert not (system["settings"].jobs_dir / spec.job_id).exists()
    assert not (Path(system["settings"].store_url) / "staging" / spec.job_id).exists()


async def test_cancel_before_start(system: dict[str, Any]) -> None:
    spec = spec_for(system)
    await enqueue_training(system["pool"], spec, queue_name=system["settings"].queue_name)
    await cancel_training(system["pool"], system["store"], spec.job_id)
    assert system["store"].get(spec.job_id)["status"] == "cancelled"


async def test_worker_start_fails_jobs_whose_worker_died(system: dict[str, Any]) -> None:
    store: JobStore = system["store"]
    spec = spec_for(system)
    store.set_status(spec.job_id, "running")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with system["db"].session() as s:
        s.execute(update(FineTuningJob).where(FineTuningJob.id == spec.job_id)
                  .values(heartbeat_at=old))
    ctx: dict[str, Any] = {"settings": system["settings"]}
    await startup(ctx)  # what a worker runs when it starts
    await shutdown(ctx)
    record = store.get(spec.job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "worker_lost"


async def test_redelivered_job_fails_instead_of_running_again(system: dict[str, Any]) -> None:
    """arq re-delivers a job whose worker died (job_try 2): it is failed, not run twice."""
    from trainer.worker import train_adapter

    store: JobStore = system["store"]
    spec = spec_for(system)
    store.set_status(spec.job_id, "running")
    ctx = {"settings": system["settings"], "store": store, "job_try": 2}
    out = await train_adapter(ctx, spec.model_dump())
    assert out["status"] == "failed"
    record = store.get(spec.job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "worker_lost"
    assert not (system["settings"].jobs_dir / spec.job_id).exists()


def test_cpu_worker_preloads_nothing() -> None:
    """Without Unsloth installed (the CPU lane) the worker's start imports no backend, and a
    backend other than auto/unsloth is never preloaded."""
    import importlib.util

    from trainer.worker import preload_backend

    assert importlib.util.find_spec("unsloth") is None
    assert preload_backend("auto") is None
    assert preload_backend("cpu") is None


async def test_second_job_does_not_grow_resident_memory(system: dict[str, Any]) -> None:
    """Two real jobs in one worker: resident memory after the second is within 400 MiB of what
    it was after the first. A job's model or optimizer kept alive past its job (SmolLM2-135M
    in float32 is 517 MiB) or freed heap pages never handed back would exceed that."""
    from trainer.memory import rss_bytes

    run = asyncio.create_task(system["worker"].async_run())
    rss: list[float] = []
    try:
        for _ in range(2):
            spec = spec_for(system, max_steps=4)
            job = await enqueue_training(system["pool"], spec,
                                         queue_name=system["settings"].queue_name)
            assert job is not None
            result = await job.result(timeout=600, poll_delay=0.5)
            assert result["status"] == "succeeded", result
            rss.append(rss_bytes() / 2**20)
    finally:
        run.cancel()
    assert rss[0] > 0
    assert rss[1] - rss[0] <= 400, f"resident memory after each job, MiB: {rss}"
