"""The monitor's jobs against SQL rows written straight into ``traffic_samples`` (no gateway):
quality runs per version, the promotion tick advancing a candidate, rolling back a regressing
canary, and promoting a good one; the cron schedule arithmetic."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from shared.db import Database
from shared.promotion import EvalRun, Promotions, PromotionSettings
from shared.registry import Registry
from shared.traffic_records import TrafficSample
from trainer.monitor import MonitorContext, run_quality, run_tick
from trainer.schedule import cron_times

LABELS = {"eval": {"labels": ["fresh", "rotten"]}}


@pytest.fixture
def mc(tmp_path: Path) -> MonitorContext:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    reg = Registry(db, str(tmp_path / "artifacts"))
    for i in (1, 2):
        d = Path(reg.store.root) / f"staging/{i}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_text(f"weights {i}")
        reg.register_version("rt", f"staging/{i}", LABELS)
    reg.set_alias("rt", "stable", 1)
    settings = PromotionSettings(min_samples=10, min_quality=0.6, tolerance=0.1,
                                 min_requests=5, max_error_rate=0.2)
    return MonitorContext(db=db, registry=reg, promotions=Promotions(db, reg, settings))


def add_rows(mc: MonitorContext, version: int, lane: str, right: int, wrong: int,
             errors: int = 0) -> None:
    with mc.db.session() as s:
        for i in range(right + wrong + errors):
            ok, failed = i < right, i >= right + wrong
            s.add(TrafficSample(
                request_id=f"{lane}-{version}-{uuid.uuid4().hex[:8]}", key_id="k",
                route="/v1/chat/completions",
                model="rt", name="rt", version=version, lane=lane, request={"messages": []},
                output="" if failed else ("fresh" if ok else "rotten"),
                status=502 if failed else 200, latency_ms=1.0, label="fresh"))


def test_quality_monitor_scores_each_version(mc: MonitorContext) -> None:
    add_rows(mc, 1, "stable", right=8, wrong=2)
    add_rows(mc, 2, "pinned", right=1, wrong=3)
    with mc.db.session() as s:  # a shadow copy is judged by its live row's label
        s.add(TrafficSample(request_id="stable-1-0-x", route="/v1/chat/completions", model="rt",
                            name="rt", version=2, lane="shadow", request={}, output="fresh",
                            status=200, latency_ms=1.0))
        s.add(TrafficSample(request_id="stable-1-0-x", route="/v1/chat/completions", model="rt",
                            name="rt", version=1, lane="stable", request={}, output="fresh",
                            status=200, latency_ms=1.0, label="rotten"))
    out = {r["version"]: r for r in run_quality(mc)}
    assert out[1]["n"] == 11 and out[1]["quality"] == pytest.approx(8 / 11)
    assert out[2]["n"] == 5 and out[2]["quality"] == pytest.approx(1 / 5)
    assert out[2]["lanes"] == {"pinned": 4, "shadow": 1}
    with mc.db.session() as s:
        assert s.query(EvalRun).filter_by(kind="quality").count() == 2


def test_tick_rolls_back_a_regressing_canary(mc: MonitorContext) -> None:
    mc.promotions.start("rt", 2, actor="trainer:j", reason="gate passed")
    [entry] = asyncio.run(run_tick(mc))
    assert (entry["action"], entry["to"]) == ("advance", "shadow")
    [entry] = asyncio.run(run_tick(mc))
    assert entry["action"] == "hold"  # no shadow evaluation yet
    mc.promotions.advance("rt", actor="key:op", reason="by hand")
    add_rows(mc, 2, "canary", right=4, wrong=2)
    add_rows(mc, 1, "stable", right=9, wrong=1)
    assert asyncio.run(run_tick(mc))[0]["action"] == "hold"  # 6 of 10 samples
    add_rows(mc, 2, "canary", right=1, wrong=5)
    [entry] = asyncio.run(run_tick(mc))
    assert entry["to"] == "rolled_back" and "quality" in entry["reason"]
    assert entry["evidence"]["quality"] == pytest.approx(5 / 12)
    aliases = mc.registry.get_adapter("rt")["aliases"]
    assert aliases["stable"] == 1 and aliases["canary"] == 1
    last = mc.promotions.get("rt")["events"][-1]
    assert last["actor"] == "monitor" and last["metrics"]["n"] == 12


def test_tick_rolls_back_on_errors_and_promotes_a_good_canary(mc: MonitorContext) -> None:
    mc.promotions.start("rt", 2, actor="op", reason="r")
    mc.promotions.advance("rt", actor="op", reason="r")
    mc.promotions.advance("rt", actor="op", reason="r")
    add_rows(mc, 2, "canary", right=3, wrong=0, errors=3)  # no Redis: rows' status counts
    [entry] = asyncio.run(run_tick(mc))
    assert entry["to"] == "rolled_back" and "error rate" in entry["reason"]

    mc.promotions.start("rt", 2, actor="op", reason="again")
    mc.promotions.advance("rt", actor="op", reason="r")
    mc.promotions.advance("rt", actor="op", reason="r")
    add_rows(mc, 2, "canary", right=9, wrong=1)
    add_rows(mc, 1, "stable", right=9, wrong=1)
    [entry] = asyncio.run(run_tick(mc))
    assert entry["to"] == "stable", entry
    assert mc.registry.get_adapter("rt")["aliases"]["stable"] == 2


def test_a_promotion_without_traffic_says_so_once(mc: MonitorContext) -> None:
    mc.promotions.start("rt", 2, actor="op", reason="r")
    mc.promotions.advance("rt", actor="op", reason="r")
    [entry] = asyncio.run(run_tick(mc))
    assert entry["action"] == "hold" and "waiting" not in entry  # not starved yet
    mc.promotions.settings.starved_after_s = 1e-6
    for _ in range(2):
        [entry] = asyncio.run(run_tick(mc))
        assert entry["action"] == "hold" and entry["waiting"] is True
    got = mc.promotions.get("rt")
    waits = [e for e in got["events"] if e["from_state"] == e["to_state"] == "shadow"]
    assert len(waits) == 1  # once per state, not every tick
    assert "waiting for traffic" in waits[0]["reason"]
    assert "/admin/promotions/rt/promote" in waits[0]["reason"]
    assert got["waiting"] == waits[0]["reason"]
    row = mc.promotions.advance("rt", actor="op", reason="by hand")
    assert row["from_state"] == "shadow" and mc.promotions.get("rt")["waiting"] is None


def test_cron_times() -> None:
    assert cron_times(0) is None
    assert cron_times(15) == {"second": {0, 15, 30, 45}}
    assert cron_times(120) == {"minute": set(range(0, 60, 2)), "second": 0}
    with pytest.raises(ValueError):
        cron_times(7)
