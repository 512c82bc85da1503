"""A running job's progress, as OpenAI reports it and as people watch it.

- **Metrics events** (``type: "metrics"``, ``data: {step, train_loss, total_steps, ...}``, the
  shape OpenAI's fine-tuning events have) are sparse: the first step, every tenth of the run and
  the last step, so a job writes at most about a dozen of them and the milestones (validated,
  training, evaluated, gate, registered) stay on the first page of ``list_events``.
- **The result file** (``result_files`` on the job, ``GET /v1/files/{id}/content``) gets one CSV
  row per optimizer step: ``step,train_loss,learning_rate,tokens_per_s,trained_tokens,elapsed_s``
  (OpenAI's result file is a per-step CSV too). Rows are appended as steps end, so the file is the
  live loss curve while the job runs.
- **The job row** carries a running ``trained_tokens``, ``estimated_finish`` and the latest step
  (``progress``), refreshed at most every ``interval_s`` seconds (it doubles as the heartbeat).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from pathlib import Path
from typing import Any

from shared.job_records import JobStore
from trainer.backends.base import JobCancelled, StepInfo

CSV_HEADER = "step,train_loss,learning_rate,tokens_per_s,trained_tokens,elapsed_s\n"
METRICS_EVENTS = 10  # metrics events per run besides the first step's


def metrics_step(step: int, total: int) -> bool:
    """Whether step ``step`` of ``total`` gets a metrics event."""
    every = max(1, math.ceil(total / METRICS_EVENTS))
    return step == 1 or step == total or step % every == 0


def metrics_data(info: StepInfo) -> dict[str, Any]:
    """OpenAI's metrics event data, plus tunegate's own keys."""
    return {
        "step": info.step,
        "train_loss": info.loss,
        "total_steps": info.total_steps,
        "epoch": info.epoch,
        "learning_rate": info.lr,
        "tokens_per_s": info.tokens_per_s,
        "trained_tokens": info.tokens,
        "eta_s": info.eta_s,
        "elapsed_s": info.elapsed_s,
    }


def csv_row(info: StepInfo) -> str:
    return (
        f"{info.step},{info.loss:.6f},{info.lr:.6g},{info.tokens_per_s:.1f},{info.tokens},"
        f"{info.elapsed_s:.2f}\n"
    )


class JobHooks:
    """Training hooks of a job: sparse metrics events, the per-step CSV, the job row's running
    fields, and cancellation."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        cancel: threading.Event,
        interval_s: float = 2.0,
        results_path: Path | None = None,
        metrics: Any = None,
    ) -> None:
        self.store, self.job_id, self.cancel, self.interval_s = store, job_id, cancel, interval_s
        self.results_path = results_path
        self.metrics = metrics  # trainer.metrics.WorkerMetrics, or None
        self._last = 0.0
        self.last_step: StepInfo | None = None

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled()

    def on_step(self, info: StepInfo) -> None:
        self.last_step = info
        if self.metrics is not None:
            self.metrics.on_step(info.tokens_per_s, info.loss)
        if self.results_path is not None:
            with self.results_path.open("a", encoding="utf-8") as f:
                f.write(csv_row(info))
        if metrics_step(info.step, info.total_steps):
            self.store.add_event(
                self.job_id,
                f"Step {info.step}/{info.total_steps}: training loss={info.loss:.4f}",
                type="metrics",
                data=metrics_data(info),
                heartbeat=False,
            )
        now = time.monotonic()
        if info.step in (1, info.total_steps) or now - self._last >= self.interval_s:
            self._last = now
            finish = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=info.eta_s)
            self.store.set_progress(
                self.job_id,
                trained_tokens=info.tokens,
                estimated_finish=finish,
                progress={
                    "step": info.step,
                    "total_steps": info.total_steps,
                    "train_loss": info.loss,
                    "learning_rate": info.lr,
                    "tokens_per_s": info.tokens_per_s,
                    "eta_s": info.eta_s,
                },
            )
        self.check_cancelled()

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        self.store.add_event(self.job_id, message, data=data)
