"""The training queue's contract (shared/job_queue.py) against a real Redis: what the gateway
puts on the queue is what the worker registers, and a cancel reaches both kinds of job."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from arq import create_pool
from arq.constants import abort_jobs_ss, job_key_prefix

from shared.db import Database, database_url
from shared.job_queue import (
    JOB_FUNCTION,
    JobQueueSettings,
    cancel_training,
    enqueue_training,
    new_job_id,
)
from shared.job_records import JobStore
from shared.job_spec import TrainSpec
from shared.queue import arq_options, redis_settings
from trainer.settings import TrainerSettings
from trainer.worker import worker_settings


def _spec(job_id: str) -> TrainSpec:
    return TrainSpec(job_id=job_id, name="q-test", base_model="/models/m", training_file="t.jsonl")


def test_the_queue_name_is_one_variable_for_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEGATE_TRAINER_QUEUE_NAME", "tunegate:elsewhere")
    from gateway.settings import GatewaySettings

    assert JobQueueSettings().queue_name == "tunegate:elsewhere"
    assert GatewaySettings().queue_name == "tunegate:elsewhere"
    worker = worker_settings(TrainerSettings())
    assert worker["queue_name"] == "tunegate:elsewhere"
    assert [f.name for f in worker["functions"]] == [JOB_FUNCTION]


async def test_enqueue_and_cancel(tmp_path: Path, redis_url: str) -> None:
    pool = await create_pool(redis_settings(redis_url), **arq_options())
    store = JobStore(Database(database_url(tmp_path)))
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    try:
        job_id = new_job_id()
        assert job_id.startswith("ftjob-") and job_id != new_job_id()
        store.create(job_id, model="m", name="q-test", spec={}, status="queued")
        job = await enqueue_training(pool, _spec(job_id), queue_name=queue)
        assert job is not None and job.job_id == job_id
        assert await pool.zscore(queue, job_id) is not None
        assert await pool.exists(job_key_prefix + job_id)
        # The same id again is not queued twice (arq refuses a known job id).
        assert await enqueue_training(pool, _spec(job_id), queue_name=queue) is None

        await cancel_training(pool, store, job_id)
        assert store.get(job_id)["status"] == "cancelled"  # type: ignore[index]
        assert await pool.zscore(abort_jobs_ss, job_id) is not None

        # A finished job is left alone; an unknown id is no error.
        done = new_job_id()
        store.create(done, model="m", name="q-test", spec={}, status="succeeded")
        await cancel_training(pool, store, done)
        await cancel_training(pool, store, "ftjob-unknown")
        assert store.get(done)["status"] == "succeeded"  # type: ignore[index]
        assert await pool.zscore(abort_jobs_ss, done) is None
    finally:
        await pool.delete(queue)
        await pool.aclose()
