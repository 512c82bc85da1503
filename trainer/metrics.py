"""Prometheus metrics of the trainer worker, on their own HTTP port
(``TUNEGATE_TRAINER_METRICS_PORT``; 0 turns them off). Own registry, no globals.

Refreshed in the background every ``refresh_s`` seconds: the queue (its depth and the age of its
oldest job, from arq's sorted set in Redis, scores in ms) and jobs by state (SQL). Set as things
happen: job durations, the running job's training tokens/s and last loss, the last evaluation's
golden-set score per adapter name, the traffic stream's ingest lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("tunegate.trainer.metrics")
JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
# Seconds: a CPU test job takes ~30 s, a GPU job minutes, a large CPU job hours.
_DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                     14400.0, 21600.0)


class WorkerMetrics:
    def __init__(self, queue_name: str) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "tunegate_trainer_"
        self.queue_name = queue_name
        self.queue_depth = Gauge(p + "queue_depth", "Jobs waiting in the queue", ["queue"],
                                 registry=r)
        self.oldest_age = Gauge(p + "queue_oldest_job_age_seconds",
                                "Age of the oldest job waiting in the queue, seconds (0: none)",
                                ["queue"], registry=r)
        self.jobs = Gauge(p + "jobs", "Fine-tuning jobs by state (records in SQL)", ["state"],
                          registry=r)
        self.duration = Histogram(p + "job_duration_seconds",
                                  "Fine-tuning job run time by outcome, seconds", ["status"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.finished = Counter(p + "jobs_finished", "Jobs this worker finished, by outcome",
                                ["status"], registry=r)
        self.tokens_per_s = Gauge(p + "train_tokens_per_second",
                                  "Training tokens/s of the running job (0: none running)",
                                  registry=r)
        self.loss = Gauge(p + "train_loss", "Last training loss of the running job (nats/token)",
                          registry=r)
        self.running = Gauge(p + "job_running", "1 while this worker runs a job", registry=r)
        self.eval_score = Gauge(p + "eval_score",
                                "Golden-set score of the last evaluated job, by adapter name",
                                ["model"], registry=r)
        self.ingest_lag = Gauge(p + "traffic_ingest_lag_seconds",
                                "Age of the oldest sampled-traffic entry not yet ingested, "
                                "seconds (0: caught up)", registry=r)
        self.ingested = Counter(p + "traffic_ingested", "Traffic stream entries by outcome",
                                ["outcome"], registry=r)
        for s in JOB_STATES:
            self.jobs.labels(s).set(0)
        for s in ("succeeded", "failed", "cancelled"):
            self.finished.labels(s)
            self.duration.labels(s)
        self.queue_depth.labels(queue_name).set(0)
        self.oldest_age.labels(queue_name).set(0)
        self._server: Any = None

    def seed_eval_scores(self, jobs: list[dict[str, Any]]) -> None:
        """The newest golden-set score per adapter name from finished job records (so that a
        restarted worker shows them before its next job)."""
        seen: set[str] = set()
        for job in jobs:  # newest first
            score = ((job.get("result") or {}).get("eval") or {}).get("score")
            name = job.get("name")
            if name and name not in seen and isinstance(score, int | float):
                seen.add(name)
                self.eval_score.labels(name).set(score)

    # ---- set as things happen -----------------------------------------------------------------
    def on_step(self, tokens_per_s: float, loss: float) -> None:
        self.tokens_per_s.set(tokens_per_s)
        self.loss.set(loss)

    def job_started(self) -> None:
        self.running.set(1)

    def job_finished(self, status: str, seconds: float) -> None:
        self.running.set(0)
        self.tokens_per_s.set(0)
        self.duration.labels(status).observe(seconds)
        self.finished.labels(status).inc()

    def ingest(self, stored: int, duplicates: int, bad: int, lag_s: float) -> None:
        self.ingested.labels("stored").inc(stored)
        self.ingested.labels("duplicate").inc(duplicates)
        self.ingested.labels("bad").inc(bad)
        self.ingest_lag.set(max(0.0, lag_s))

    # ---- refreshed in the background ------------------------------------------------------------
    async def refresh(self, redis: Any, count_jobs: Any) -> None:
        q = self.queue_name
        depth = await redis.zcard(q)
        oldest = await redis.zrange(q, 0, 0, withscores=True)
        self.queue_depth.labels(q).set(depth)
        # arq scores a job with the time it may run (enqueue time unless deferred), in ms.
        age = time.time() - oldest[0][1] / 1000 if oldest else 0.0
        self.oldest_age.labels(q).set(max(0.0, age))
        counts = await asyncio.to_thread(count_jobs)
        for s in JOB_STATES:
            self.jobs.labels(s).set(counts.get(s, 0))

    async def refresh_forever(self, redis: Any, count_jobs: Any, every_s: float) -> None:
        while True:
            try:
                await self.refresh(redis, count_jobs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or SQL down: keep the last values, try again
                log.warning("trainer metrics refresh failed: %r", exc)
            await asyncio.sleep(every_s)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server = start_http_server(port, addr=host, registry=self.registry)
        log.info("trainer metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                server, thread = self._server
                server.shutdown()
                thread.join(timeout=5)
            self._server = None
