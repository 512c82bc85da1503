"""Progress reporting: sparse metrics events, the estimator behind ``estimated_finish``, what
``"auto"`` epochs choose, and the hooks' writes to a real job record and result CSV."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from shared.db import Database
from shared.job_records import JobStore
from shared.job_spec import auto_epochs
from trainer.backends.base import JobCancelled, StepInfo
from trainer.backends.loop import Eta
from trainer.progress import CSV_HEADER, JobHooks, metrics_step


@pytest.mark.parametrize("total", [1, 2, 7, 15, 100, 678, 5000])
def test_metrics_events_are_sparse_and_keep_first_and_last(total: int) -> None:
    steps = [s for s in range(1, total + 1) if metrics_step(s, total)]
    assert steps[0] == 1 and steps[-1] == total
    assert len(steps) <= 12
    assert len(steps) >= min(total, 8)  # still a curve


def test_eta_after_five_steps_is_within_30_percent_of_the_truth() -> None:
    """Length-grouped batches cost in proportion to their padded tokens, and the first step pays
    a one-time warm-up: the estimator must see through both (the per-step average said 7,100 s
    for a run that took 1,011 s)."""
    rng = random.Random(0)
    costs = [8 * rng.choice([30, 60, 120, 250, 400]) for _ in range(300)]
    s_per_token = 1e-3
    warmup_s = 40.0  # the first step's one-time cost
    ends, t = [], 0.0
    for i, c in enumerate(costs):
        t += c * s_per_token * rng.uniform(0.9, 1.1) + (warmup_s if i == 0 else 0)
        ends.append(t)
    eta = Eta(costs)
    for step in range(1, 6):
        left = eta.update(step, ends[step - 1], 0.0)
    truth = ends[-1] - ends[4]
    assert abs(left - truth) / truth < 0.3, (left, truth)
    naive = ends[4] / 5 * (len(costs) - 5)
    assert abs(naive - truth) / truth > 0.3  # what the old estimate said was far off


def test_eta_sees_through_a_warm_up_of_several_slow_steps() -> None:
    """The timeline of a fresh worker's first job (bench/trainer_memory.py): steps 1 to 3 took
    14.5, 15.2 and 46.7 s, then about 0.6 s each; an average since the first step said 4.7 times
    the truth at step 5."""
    rng = random.Random(1)
    costs = [2 * rng.choice([40, 60, 90, 120]) for _ in range(300)]
    mean_cost = sum(costs) / len(costs)
    warm = {0: 14.5, 1: 15.2, 2: 46.7}
    ends, t = [], 0.0
    for i, c in enumerate(costs):
        t += warm.get(i, 0.6 * c / mean_cost * rng.uniform(0.85, 1.15))
        ends.append(t)
    eta = Eta(costs)
    for step in range(1, len(costs) + 1):
        left = eta.update(step, ends[step - 1], 0.0)
        truth = ends[-1] - ends[step - 1]
        if 5 <= step < len(costs) - 20:  # near the end a few seconds are a large share
            assert abs(left - truth) / truth < 0.3, (step, left, truth)
    averaged = (ends[4] - ends[0]) / sum(costs[1:5]) * sum(costs[5:])
    assert averaged / (ends[-1] - ends[4]) > 3  # what the estimate since the first step said


def test_eta_follows_a_lasting_change_of_pace() -> None:
    costs = [100] * 200
    ends, t = [], 0.0
    for i in range(200):
        t += 1.0 if i < 100 else 2.0  # the machine gets busy halfway
        ends.append(t)
    eta = Eta(costs)
    for step in range(1, 111):
        left = eta.update(step, ends[step - 1], 0.0)
    assert left == pytest.approx(ends[-1] - ends[109], rel=0.05)


@pytest.mark.parametrize(
    ("n", "epochs"),
    [
        (10, 10),
        (30, 4),
        (34, 3),
        (1800, 3),
        (8333, 3),
        (9000, 2),
        (25_000, 1),
        (1_000_000, 1),
        (1, 25),
    ],
)
def test_auto_epochs_follow_dataset_size(n: int, epochs: int) -> None:
    assert auto_epochs(n) == epochs


def _info(step: int, total: int) -> StepInfo:
    return StepInfo(
        step=step,
        total_steps=total,
        epoch=step / total,
        loss=2.0 / step,
        lr=1e-4,
        tokens_per_s=500.0,
        eta_s=float(total - step),
        elapsed_s=float(step),
        tokens=100 * step,
    )


def test_hooks_write_csv_rows_sparse_events_and_running_fields(tmp_path: Path) -> None:
    store = JobStore(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    store.create("ftjob-p", model="m", name="n", spec={}, status="running")
    csv = tmp_path / "r.csv"
    csv.write_text(CSV_HEADER)
    cancel = threading.Event()
    hooks = JobHooks(store, "ftjob-p", cancel, interval_s=0.0, results_path=csv)
    for step in range(1, 51):
        hooks.on_step(_info(step, 50))
    rows = csv.read_text().splitlines()
    assert rows[0] == CSV_HEADER.strip() and len(rows) == 51
    assert rows[50].startswith("50,0.04")
    events = store.events("ftjob-p", type="metrics")
    assert 10 <= len(events) <= 12
    last = events[-1]["data"]
    assert {"step", "train_loss", "total_steps"} <= set(last) and last["step"] == 50
    job = store.get("ftjob-p")
    assert job is not None and job["trained_tokens"] == 5000
    assert job["progress"]["step"] == 50 and job["estimated_finish"] is not None
    cancel.set()
    with pytest.raises(JobCancelled):
        hooks.on_step(_info(51, 60))


def test_memory_helpers_work_here() -> None:
    from trainer.memory import release, rss_bytes, trim

    assert rss_bytes() > 10 * 2**20  # this interpreter, pytest and torch: tens of MB at least
    assert trim() in (True, False)  # False only where the C library has no malloc_trim
    release()
