"""Registered replicas (``/admin/replicas``): real gateway processes over one SQLite database and
fake replicas (bench/fake_upstream.py). The static replica is a dead address, so a chat answers
only when a registered one is routed to."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Records, auth, chat, fake_replica, gateway
from tests.procs import free_port


@pytest.fixture(scope="module")
def dead() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def gw(data_dir: Path, dead: str) -> Iterator[str]:
    with gateway(data_dir, [dead]) as url:
        yield url


@pytest.fixture(scope="module")
def admin(records: Records) -> str:
    return records.key("admin")


def listing(base: str, key: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{base}/admin/replicas", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return {item["url"]: item for item in r.json()["data"]}


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def answer(base: str, key: str) -> str | None:
    r = chat(base, key)
    if r.status_code != 200:
        return None
    return str(r.json()["choices"][0]["message"]["content"])


def test_registered_replica_is_routed_to_until_deregistered(gw: str, admin: str,
                                                            dead: str) -> None:
    assert chat(gw, admin).status_code == 503  # only the dead static replica
    with fake_replica("dyn") as (url, _):
        r = httpx.post(f"{gw}/admin/replicas", headers=auth(admin),
                       json={"url": url + "/", "kind": "vllm"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["url"] == url and body["kind"] == "vllm" and body["healthy"] is True
        # Idempotent: a second registration refreshes it.
        again = httpx.post(f"{gw}/admin/replicas", headers=auth(admin), json={"url": url})
        assert again.status_code == 200, again.text
        assert again.json()["last_seen"] >= body["last_seen"]
        assert again.json()["kind"] == "vllm"  # kept when not given again

        # Routed to at once by the gateway that registered it.
        assert (answer(gw, admin) or "").startswith("dyn|")
        replicas = listing(gw, admin)
        assert replicas[url]["source"] == "registered" and replicas[url]["kind"] == "vllm"
        assert replicas[dead]["source"] == "static" and "kind" not in replicas[dead]

        r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": url})
        assert r.status_code == 200, r.text
        assert r.json()["deleted"] is True
        assert url not in listing(gw, admin)
        assert chat(gw, admin).status_code == 503
        r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": url})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "replica_not_found"


def test_second_gateway_on_the_same_database_sees_registrations(
        gw: str, admin: str, data_dir: Path, dead: str) -> None:
    with fake_replica("shared") as (url, _), gateway(data_dir, [dead]) as other:
        assert chat(other, admin).status_code == 503
        r = httpx.post(f"{gw}/admin/replicas", headers=auth(admin),
                       json={"url": url, "kind": "embedded"})
        assert r.status_code == 201, r.text
        # The other process reloads the registered URLs on its next health round (0.3 s here).
        eventually(lambda: (answer(other, admin) or "").startswith("shared|"))
        assert listing(other, admin)[url]["kind"] == "embedded"

        r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": url})
        assert r.status_code == 200, r.text
        eventually(lambda: url not in listing(other, admin))
        assert chat(other, admin).status_code == 503


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1:9000", "127.0.0.1:9000", "http://", "http://:9000",
    "http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:port",
    "http://user:secret@127.0.0.1:9000", "http://127.0.0.1:9000/?x=1",
    "http://127.0.0.1:9000/#top", ""])
def test_bad_urls_are_400(gw: str, admin: str, url: str) -> None:
    r = httpx.post(f"{gw}/admin/replicas", headers=auth(admin), json={"url": url})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "url", err
    if url:
        r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": url})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_kind_is_a_short_word(gw: str, admin: str) -> None:
    r = httpx.post(f"{gw}/admin/replicas", headers=auth(admin),
                   json={"url": "http://127.0.0.1:9", "kind": "no spaces please"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "kind"


def test_static_replica_cannot_be_removed(gw: str, admin: str, dead: str) -> None:
    r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": dead})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"], "type": "conflict_error", "param": "url",
        "code": "static_replica"}
    assert dead in listing(gw, admin)


def test_user_keys_get_403(gw: str, records: Records) -> None:
    user = records.key("user")
    target = "http://127.0.0.1:9"
    for headers in (auth(user), {}):
        for r in (httpx.post(f"{gw}/admin/replicas", headers=headers, json={"url": target}),
                  httpx.delete(f"{gw}/admin/replicas", headers=headers, params={"url": target}),
                  httpx.get(f"{gw}/admin/replicas", headers=headers)):
            assert r.status_code == (403 if headers else 401), (r.request.method, r.text)
            assert r.json()["error"]["type"] == ("permission_error" if headers
                                                 else "authentication_error")


def test_registration_answers_with_a_checked_replica_after_a_background_sync(
        tmp_path: Path) -> None:
    # The background health round can add a just-registered replica (sync_registered) before
    # the registering request does; the answer must still report a checked, healthy replica.
    import asyncio

    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    records = Records(tmp_path)
    admin = auth(records.key("admin"))
    settings = GatewaySettings(data_dir=tmp_path, engines=[f"http://127.0.0.1:{free_port()}"],
                               redis_url=None, health_interval_s=3600)
    with fake_replica("raced") as (url, _), TestClient(create_app(settings)) as c:
        state = c.app.state.tg  # type: ignore[attr-defined]
        state.replicas.register(url, "vllm")
        added = asyncio.run(state.router.sync_registered())  # what a health round does first
        assert [r.url for r in added] == [url] and added[0].last_check == 0.0
        r = c.post("/admin/replicas", headers=admin, json={"url": url})
        assert r.status_code == 200, r.text
        assert r.json()["healthy"] is True and r.json()["last_check"] > 0
