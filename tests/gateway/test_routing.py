"""Routing over two fake replicas: adapter affinity, load once per replica, failover."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Records, auth, chat, fake_replica, gateway
from tests.procs import stop


@pytest.fixture(scope="module")
def cluster(data_dir: Path) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    with fake_replica("r1", load_delay_s=0.3) as a, fake_replica("r2", load_delay_s=0.3) as b, \
            gateway(data_dir, [a[0], b[0]]) as gw:
        yield gw, [a, b]


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"].split("|")[0])


def stats(url: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(url + "/fake/stats").json()  # type: ignore[no-any-return]


def load(url: str, ref: str, path: str) -> None:
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": ref, "lora_path": path})
    assert r.status_code == 200


def test_affinity_prefers_the_replica_holding_the_version(cluster, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, [(r1, _), (r2, _)] = cluster
    admin = records.key("admin")
    a, b = records.adapter("alpha"), records.adapter("beta")
    load(r1, a, "/x")
    load(r2, b, "/y")
    httpx.post(gw + "/admin/replicas/check", headers=auth(admin))
    for _ in range(4):
        assert served_by(chat(gw, admin, model="alpha")) == "r1"
        assert served_by(chat(gw, admin, model="beta")) == "r2"
    assert stats(r1)["loads"] == {a: 1} and stats(r2)["loads"] == {b: 1}


def test_concurrent_requests_load_a_version_once_per_replica(cluster, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, [(r1, _), (r2, _)] = cluster
    key = records.key("user")
    ref = records.adapter("gamma")
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: chat(gw, key, model="gamma"), range(12)))
    assert all(r.status_code == 200 and r.json()["model"] == ref for r in results)
    for url in (r1, r2):
        s = stats(url)
        assert s["loads"].get(ref, 0) <= 1
        assert s["peak_loading"].get(ref, 0) <= 1
    assert sum(stats(u)["loads"].get(ref, 0) for u in (r1, r2)) >= 1


def test_failover_when_a_replica_dies(cluster, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, [(r1, p1), (r2, _)] = cluster
    key = records.key("user")
    admin = records.key("admin")
    ref = records.adapter("delta")
    load(r1, ref, "/z")
    httpx.post(gw + "/admin/replicas/check", headers=auth(admin))
    assert served_by(chat(gw, key, model="delta")) == "r1"
    stop(p1)  # type: ignore[arg-type]
    # Straight away (before a health check notices): refused connections go to r2.
    for _ in range(5):
        assert served_by(chat(gw, key, model="delta")) == "r2"
        assert served_by(chat(gw, key)) == "r2"
    time.sleep(0.8)
    status = {r["url"]: r for r in
              httpx.get(gw + "/admin/replicas", headers=auth(admin)).json()["data"]}
    assert status[r1]["healthy"] is False and status[r2]["healthy"] is True
    assert ref in status[r2]["adapters"]
    metrics = httpx.get(gw + "/metrics").text
    assert f'tunegate_gateway_replica_healthy{{replica="{r1}"}} 0.0' in metrics


def test_adapter_evicted_by_the_engine_is_loaded_again(cluster, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, [(r1, _), (r2, _)] = cluster
    key = records.key("user")
    ref = records.adapter("epsilon")
    first = served_by(chat(gw, key, model="epsilon"))
    url = r1 if first == "r1" else r2
    # The engine drops it behind the gateway's back (its own LRU bound, a restart...).
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": ref})
    assert r.status_code == 200
    resp = chat(gw, key, model="epsilon")
    assert resp.status_code == 200 and resp.json()["model"] == ref
    assert served_by(resp) == first and ref in stats(url)["adapters"]
