"""The cost record's arithmetic (trainer.cost): phases add up, a switch closes the phase before,
the estimate is seconds times the hourly price, unknown phases are refused."""

from __future__ import annotations

import pytest

from trainer.cost import PHASES, CostMeter, cost_message


class Ticks:
    """A clock that reads the seconds the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_and_price_the_total() -> None:
    t = Ticks()
    meter = CostMeter(price_per_device_hour=3.6, clock=t)
    meter.enter("validate")
    t.now += 2.0
    meter.enter("train")
    t.now += 100.0
    meter.enter("evaluate")
    t.now += 5.0
    meter.enter("train")  # a phase entered twice adds up
    t.now += 10.0
    meter.enter("register")
    t.now += 1.0
    meter.stop()
    t.now += 50.0  # after stop nothing counts
    meter.stop()
    cost = meter.report(12_345)
    assert cost["device_seconds"] == {
        "validate": 2.0,
        "train": 110.0,
        "evaluate": 5.0,
        "register": 1.0,
        "total": 118.0,
    }
    assert cost["trained_tokens"] == 12_345
    assert cost["estimated_cost"] == pytest.approx(118.0 / 3600 * 3.6)
    assert cost["currency"] == "usd" and cost["price_per_device_hour"] == 3.6
    msg = cost_message(cost)
    assert "12,345 trained tokens" in msg and "118.0 device seconds" in msg


def test_empty_job_costs_nothing_and_unknown_phase_is_refused() -> None:
    meter = CostMeter(price_per_device_hour=0.0)
    cost = meter.report(None)
    assert cost["trained_tokens"] == 0 and cost["estimated_cost"] == 0.0
    assert set(cost["device_seconds"]) == {*PHASES, "total"}
    with pytest.raises(ValueError, match="unknown phase"):
        meter.enter("warmup")
