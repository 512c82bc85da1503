"""The training queue's contract, shared by the gateway (queues and cancels jobs) and the trainer
worker (runs them): the arq function name, the queue name, job ids, and the abort key.

A job's record (``shared.job_records``) is written before the job is queued; the arq job id is the
job's id, so a cancel can reach a queued or running job by id alone.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from arq.constants import abort_jobs_ss
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.job_records import ACTIVE, JobStore
from shared.job_spec import TrainSpec

if TYPE_CHECKING:
    from arq import ArqRedis
    from arq.jobs import Job

JOB_FUNCTION = "train_adapter"  # the arq function the worker registers
DEFAULT_QUEUE_NAME = "tunegate:trainer"
# arq's sorted set of job ids to abort (``arq.constants.abort_jobs_ss``); a worker started with
# ``allow_abort_jobs`` cancels a listed job at its next poll.
ABORT_KEY = abort_jobs_ss


class JobQueueSettings(BaseSettings):
    """The training queue's name, read by both sides under one variable."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_TRAINER_", extra="ignore",
                                      populate_by_name=True)

    queue_name: str = Field(
        default=DEFAULT_QUEUE_NAME,
        validation_alias=AliasChoices("queue_name", "TUNEGATE_TRAINER_QUEUE_NAME"),
        description="The arq queue of training jobs (gateway and worker must agree).")


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


async def enqueue_training(pool: ArqRedis, spec: TrainSpec, *, queue_name: str) -> Job | None:
    """Queue a job (its record must exist); the arq job id is the job's id."""
    job: Job | None = await pool.enqueue_job(JOB_FUNCTION, spec.model_dump(mode="json"),
                                             _job_id=spec.job_id, _queue_name=queue_name)
    return job


async def cancel_training(pool: Any, store: JobStore, job_id: str) -> None:
    """Cancel a job: a queued one at once; a running one through arq's abort (the worker stops
    at the next training step and writes ``cancelled``)."""
    record = store.get(job_id)
    if record is None or record["status"] not in ACTIVE:
        return
    if store.set_status(job_id, "cancelled", only_from=frozenset({"validating_files", "queued"})):
        store.add_event(job_id, "Job cancelled before it started", heartbeat=False)
    # What arq's Job.abort does, without waiting for the result.
    await pool.zadd(ABORT_KEY, {job_id: int(time.time() * 1000)})
