"""When ``stable`` moves, requests go to the new version and the old one leaves the replica; a
rollback sends them back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.gateway.conftest import Records, chat, fake_replica, gateway


def held(engine: str) -> set[str]:
    return set(httpx.get(engine + "/fake/stats").json()["adapters"])


def test_old_version_is_unloaded_after_stable_moves(data_dir: Path, records: Records) -> None:
    key = records.key("user")
    with fake_replica("r1") as (engine, _), gateway(
            data_dir, [engine], env={"TUNEGATE_GATEWAY_UNLOAD_IDLE_S": "0.5"}) as gw:
        old = records.adapter("roll")
        assert chat(gw, key, model="roll").json()["model"] == old
        assert old in held(engine)
        new = records.adapter("roll")  # registers v2 and points stable at it
        time.sleep(0.5)  # the gateway's resolution cache (0.2 s in tests)
        assert chat(gw, key, model="roll").json()["model"] == new
        deadline = time.monotonic() + 10
        while old in held(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert old not in held(engine) and new in held(engine)
        # A client pinning the old version still gets it (loaded again on demand).
        assert chat(gw, key, model=old).json()["model"] == old
        # Rollback (what `tunegate adapters rollback roll` does): bare-name requests go back.
        assert records.registry.rollback("roll", "stable") == 1
        time.sleep(0.5)
        assert chat(gw, key, model="roll").json()["model"] == old
