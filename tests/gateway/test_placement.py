"""Two gateway processes on one Redis (gateway.placement): a new adapter version is loaded on one
replica, not one per gateway; a replica one gateway cannot reach is skipped by both, at the cost
of one failed attempt, until a health check admits it again."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.topology_parts import unreachable_count
from tests.gateway.conftest import FAKE, Records, auth, chat, fake_replica, gateway
from tests.gateway.test_routing import served_by, stats
from tests.procs import run_server


def healthy(gw: str, admin: str) -> dict[str, bool]:
    data = httpx.get(gw + "/admin/replicas", headers=auth(admin)).json()["data"]
    return {d["url"]: d["healthy"] for d in data}


@contextlib.contextmanager
def two_gateways(data_dir: Path, redis_url: str, r1: str, r2: str,
                 **env: str) -> Iterator[tuple[str, str]]:
    # Opposite orders: on their own, each gateway's first choice for a new version differs.
    with gateway(data_dir, [r1, r2], redis_url, env=env) as a, \
            gateway(data_dir, [r2, r1], redis_url, env=env) as b:
        yield a, b


def test_a_new_version_is_loaded_on_one_replica_across_gateways(
        data_dir: Path, records: Records, redis_url: str) -> None:
    with fake_replica("r1", load_delay_s=1.0) as (r1, _), \
            fake_replica("r2", load_delay_s=1.0) as (r2, _), \
            two_gateways(data_dir, redis_url, r1, r2) as (a, b):
        key = records.key("user")
        name = f"placed-{uuid.uuid4().hex[:8]}"
        ref = records.adapter(name)
        with cf.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: chat((a, b)[i % 2], key, model=name),
                                    range(12)))
        assert all(r.status_code == 200 and r.json()["model"] == ref for r in results), \
            [r.text for r in results]
        loads = [stats(u)["loads"].get(ref, 0) for u in (r1, r2)]
        assert sum(loads) == 1, loads
        holder = "r1" if loads[0] else "r2"
        assert {served_by(r) for r in results} == {holder}
        # Later requests through either gateway stay on that replica.
        for gw in (a, b, a, b):
            assert served_by(chat(gw, key, model=name)) == holder
        assert [stats(u)["loads"].get(ref, 0) for u in (r1, r2)] == loads


def test_a_dead_replica_costs_one_attempt_and_is_skipped_by_both_gateways(
        data_dir: Path, records: Records, redis_url: str) -> None:
    key, admin = records.key("user"), records.key("admin")
    # Health rounds far apart: only the request path and the shared report can mark it down.
    with fake_replica("r1") as (r1, p1), fake_replica("r2") as (r2, _), \
            two_gateways(data_dir, redis_url, r1, r2,
                         TUNEGATE_GATEWAY_HEALTH_INTERVAL_S="600") as (a, b):
        assert served_by(chat(a, key)) == "r1"  # a's first choice
        p1.kill()  # type: ignore[attr-defined]
        p1.wait()  # type: ignore[attr-defined]
        assert served_by(chat(a, key)) == "r2"  # refused on r1, retried on r2
        deadline = time.monotonic() + 10
        while healthy(b, admin)[r1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy(b, admin) == {r1: False, r2: True}
        for _ in range(10):
            assert served_by(chat(a, key)) == "r2"
            assert served_by(chat(b, key)) == "r2"
        assert unreachable_count(a, r1) == 1
        assert unreachable_count(b, r1) == 0
        # Back on its port: the next health check admits it again.
        port = int(r1.rsplit(":", 1)[1])
        with run_server([sys.executable, str(FAKE), "--port", str(port), "--name", "r1b"],
                        port=port, timeout_s=30):
            for gw in (a, b):
                httpx.post(gw + "/admin/replicas/check", headers=auth(admin))
                assert healthy(gw, admin) == {r1: True, r2: True}
            assert served_by(chat(a, key)) == "r1b"

