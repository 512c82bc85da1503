"""The promotion state machine over a real registry (SQLite): transitions, aliases, events,
concurrency guard, and the automatic gate rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.db import Database
from shared.errors import Conflict
from shared.promotion import Evidence, Policy, Promotions, PromotionSettings, decide
from shared.registry import Registry


@pytest.fixture
def promotions(tmp_path: Path) -> Promotions:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    reg = Registry(db, str(tmp_path / "artifacts"))
    for i in (1, 2, 3):
        d = Path(reg.store.root) / f"staging/{i}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_text(f"weights {i}")
        reg.register_version("sent", f"staging/{i}", {"metrics": {"golden_score": 0.9}})
    reg.set_alias("sent", "stable", 1)
    return Promotions(db, reg, PromotionSettings(canary_weight=0.2))


def aliases(p: Promotions) -> dict[str, int]:
    return p.registry.get_adapter("sent")["aliases"]  # type: ignore[no-any-return]


def test_candidate_to_stable_moves_aliases_and_records_events(promotions: Promotions) -> None:
    p = promotions.start("sent", 2, actor="trainer:job", reason="gate passed")
    assert (p["state"], p["baseline"], p["canary_weight"]) == ("candidate", 1, 0.2)
    assert promotions.routes() == {}  # a candidate is not routed
    assert promotions.advance("sent", actor="monitor", reason="ok")["state"] == "shadow"
    assert promotions.routes()["sent"].state == "shadow"
    assert "canary" not in aliases(promotions)
    promotions.advance("sent", actor="monitor", reason="shadow ok", metrics={"n": 50})
    assert aliases(promotions)["canary"] == 2 and aliases(promotions)["stable"] == 1
    assert promotions.advance("sent", actor="monitor", reason="canary ok")["state"] == "stable"
    assert aliases(promotions)["stable"] == 2
    assert promotions.routes() == {}
    got = promotions.get("sent")
    assert [(e["from_state"], e["to_state"]) for e in got["events"]] == [
        (None, "candidate"), ("candidate", "shadow"), ("shadow", "canary"), ("canary", "stable")]
    assert got["events"][2]["metrics"] == {"n": 50}
    assert got["events"][0]["actor"] == "trainer:job"
    with pytest.raises(Conflict):  # terminal
        promotions.advance("sent", actor="x", reason="y")
    # Rolling back a promotion that reached stable moves stable back to its baseline.
    assert promotions.stop("sent", actor="op", reason="bad")["state"] == "rolled_back"
    assert aliases(promotions)["stable"] == 1 and aliases(promotions)["canary"] == 1


def test_stop_rejects_before_canary_and_rolls_back_after(promotions: Promotions) -> None:
    promotions.start("sent", 2, actor="op", reason="try")
    promotions.advance("sent", actor="op", reason="go")
    assert promotions.stop("sent", actor="monitor", reason="worse")["state"] == "rejected"
    promotions.start("sent", 3, actor="op", reason="try again")
    promotions.advance("sent", actor="op", reason="go")
    promotions.advance("sent", actor="op", reason="go")
    assert aliases(promotions)["canary"] == 3
    assert promotions.stop("sent", actor="monitor", reason="regressed")["state"] == "rolled_back"
    assert aliases(promotions) == {"latest": 3, "stable": 1, "canary": 1}
    assert promotions.current("sent")["version"] == 3  # type: ignore[index]


def test_guards(promotions: Promotions) -> None:
    with pytest.raises(Conflict):
        promotions.start("sent", 1, actor="op", reason="already stable")
    first = promotions.start("sent", 2, actor="op", reason="a")
    with pytest.raises(Conflict):  # one active promotion per name
        promotions.start("sent", 3, actor="op", reason="b")
    promotions.advance("sent", actor="op", reason="go")
    with pytest.raises(Conflict):  # a tick that saw an older promotion id loses
        promotions.advance("sent", actor="monitor", reason="late", promotion_id=first["id"] + 1)
    promotions.registry.set_alias("sent", "stable", 3)
    promotions.stop("sent", actor="op", reason="x")
    with pytest.raises(Conflict):  # stable moved away from it: nothing of it to roll back
        promotions.stop("sent", actor="op", reason="again")


def test_no_stable_means_no_promotion(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    reg = Registry(db, str(tmp_path / "artifacts"))
    (Path(reg.store.root) / "staging/1").mkdir(parents=True)
    (Path(reg.store.root) / "staging/1/w").write_text("w")
    reg.register_version("x", "staging/1", {})
    with pytest.raises(Conflict):
        Promotions(db, reg).start("x", 1, actor="op", reason="r")


POLICY = Policy(min_samples=10, min_quality=0.7, tolerance=0.05, max_error_rate=0.1,
                min_requests=10)


@pytest.mark.parametrize(("state", "ev", "action"), [
    ("candidate", Evidence(), "advance"),
    ("canary", Evidence(n=5, quality=0.1), "hold"),  # too few samples to judge
    ("canary", Evidence(n=20, quality=0.9, stable_quality=0.9, requests=20), "advance"),
    ("canary", Evidence(n=20, quality=0.6, stable_quality=0.5, requests=20), "stop"),  # absolute
    ("canary", Evidence(n=20, quality=0.8, stable_quality=0.9, requests=20), "stop"),  # relative
    ("canary", Evidence(n=20, quality=0.86, stable_quality=0.9, requests=20), "advance"),
    ("canary", Evidence(n=2, requests=20, errors=3), "stop"),  # errors need no labels
    ("canary", Evidence(n=2, requests=5, errors=3), "hold"),  # too few requests to judge
    ("canary", Evidence(n=20, quality=0.9, requests=5), "hold"),
    ("shadow", Evidence(n=20, quality=0.9, stable_quality=0.8), "advance"),
    ("shadow", Evidence(n=20, quality=0.5, stable_quality=0.8), "stop"),
    ("stable", Evidence(), "hold"),
])
def test_decide(state: str, ev: Evidence, action: str) -> None:
    assert decide(state, ev, POLICY).action == action
