"""The promotions admin API in-process (no engine needed): start, promote, rollback, state and
events, OpenAI-shaped errors, admin scope; and the quality gauge on /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.promotion import EvalRun
from tests.gateway.conftest import Records, auth


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Records]]:
    records = Records(tmp_path)
    records.adapter("rt")  # v1, stable
    records.adapter("rt", stable=False)  # v2
    settings = GatewaySettings(data_dir=tmp_path, engines=["http://127.0.0.1:9"],
                               redis_url=None, quality_refresh_s=0.05)
    with TestClient(create_app(settings)) as c:
        yield c, records


def test_promotion_by_hand(client: tuple[TestClient, Records]) -> None:
    c, records = client
    admin, user = auth(records.key("admin")), auth(records.key("user"))
    r = c.post("/admin/promotions", json={"version": "rt@v2"}, headers=user)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = c.get("/admin/promotions/rt", headers=admin)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = c.post("/admin/promotions", json={"version": "rt"}, headers=admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == "version"
    r = c.post("/admin/promotions", json={"version": "rt@v2", "canary_weight": 0.5},
               headers=admin)
    assert r.status_code == 201 and r.json()["state"] == "candidate", r.text
    assert c.post("/admin/promotions", json={"version": "rt@v2"},
                  headers=admin).json()["error"]["code"] == "promotion_active"
    r = c.post("/admin/promotions/rt/promote", json={"to": "canary"}, headers=admin)
    assert r.json()["state"] == "canary"
    assert r.json()["from_state"] == "candidate"  # the state it left, not the last hop's
    assert c.app.state.tg.promotions.routes["rt"].canary_weight == 0.5  # type: ignore[attr-defined]
    r = c.post("/admin/promotions/rt/promote", json={"to": "shadow"}, headers=admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_transition"
    assert c.get("/admin/promotions", headers=admin).json()["data"][0]["ref"] == "rt@v2"
    r = c.post("/admin/promotions/rt/rollback", json={"reason": "looks bad"}, headers=admin)
    assert r.json()["state"] == "rolled_back"
    got = c.get("/admin/promotions/rt", headers=admin).json()
    assert [e["to_state"] for e in got["events"]] == ["candidate", "shadow", "canary",
                                                      "rolled_back"]
    assert got["events"][-1]["reason"] == "looks bad"
    assert got["events"][-1]["actor"].startswith("key:")
    assert records.registry.get_adapter("rt")["aliases"]["canary"] == 1


def test_frequent_quality_runs_leave_the_shadow_evaluation_in_view(
        client: tuple[TestClient, Records]) -> None:
    c, records = client
    admin = auth(records.key("admin"))
    assert c.post("/admin/promotions", json={"version": "rt@v2"},
                  headers=admin).status_code == 201
    with records.db.session() as s:
        s.add(EvalRun(name="rt", version=2, kind="shadow", n=80, score=0.85, metrics={}))
        for i in range(25):  # the quality monitor, every few seconds during the canary
            s.add(EvalRun(name="rt", version=2, kind="quality", n=i, score=0.8, metrics={}))
        s.add(EvalRun(name="rt", version=1, kind="quality", n=5, score=0.7, metrics={}))
    evals = c.get("/admin/promotions/rt", headers=admin).json()["evals"]
    assert [e["kind"] for e in evals] == ["quality"] * 20 + ["shadow"]
    assert [e["n"] for e in evals[:20]] == list(range(24, 4, -1))  # the newest 20, newest first
    assert evals[-1]["score"] == 0.85


def test_quality_gauge(client: tuple[TestClient, Records]) -> None:
    import time

    c, records = client
    with records.db.session() as s:
        s.add(EvalRun(name="rt", version=1, kind="quality", n=10, score=0.9, metrics={}))
    deadline = time.monotonic() + 5
    while 'tunegate_quality_score{model="rt",version="v1"} 0.9' not in c.get("/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
