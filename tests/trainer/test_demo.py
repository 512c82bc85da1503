"""`tunegate demo`'s event follower against a scripted client: events printed once each, oldest
first, progress lines from metrics events, and it returns when the job ends. (The whole demo runs
end to end against `tunegate up`; see trainer/demo.py.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from trainer.demo import _extra, follow


class ScriptedJobs:
    def __init__(self, pages: list[tuple[str, list[Any]]]) -> None:
        self.pages = pages  # (status, events newest first) per poll
        self.i = -1
        self.cancelled = False

    def retrieve(self, job_id: str) -> Any:
        self.i = min(self.i + 1, len(self.pages) - 1)
        return SimpleNamespace(id=job_id, status=self.pages[self.i][0], model_extra={
            "tunegate": {"result": {"eval": {"score": 0.9}}}})

    def list_events(self, job_id: str, limit: int) -> Any:
        return SimpleNamespace(data=self.pages[self.i][1])

    def cancel(self, job_id: str) -> None:
        self.cancelled = True


def ev(i: int, message: str, type_: str = "message", **data: Any) -> Any:
    return SimpleNamespace(id=f"ftevent-{i}", message=message, type=type_, data=data or None)


def test_follow_prints_each_event_once_in_order_until_the_job_ends() -> None:
    step = {"step": 1, "total_steps": 2, "train_loss": 1.5, "learning_rate": 1e-3,
            "tokens_per_s": 100.0, "eta_s": 3.0}  # OpenAI's metrics shape
    e1, e2 = ev(1, "Validated"), ev(2, "Step 1", "metrics", **step)
    e3 = ev(3, "Job succeeded")
    jobs = ScriptedJobs([("running", [e1]), ("running", [e2, e1]), ("succeeded", [e3, e2, e1])])
    client = SimpleNamespace(fine_tuning=SimpleNamespace(jobs=jobs))
    lines: list[str] = []
    job = follow(client, "ftjob-1", timeout_s=60, poll_s=0, echo=lines.append)
    assert job.status == "succeeded" and not jobs.cancelled
    assert lines == ["  Validated",
                     "  [" + "#" * 15 + "." * 15 + "] 1/2 loss 1.5000 100 tok/s ETA 3 s",
                     "  Job succeeded"]
    assert _extra(job) == {"eval": {"score": 0.9}}


def test_follow_cancels_a_job_past_the_timeout() -> None:
    jobs = ScriptedJobs([("running", [])])
    client = SimpleNamespace(fine_tuning=SimpleNamespace(jobs=jobs))
    try:
        follow(client, "ftjob-2", timeout_s=0, poll_s=0, echo=lambda _: None)
    except SystemExit as exc:
        assert "cancelled" in str(exc)
    else:
        raise AssertionError("follow returned for a running job past its timeout")
    assert jobs.cancelled
