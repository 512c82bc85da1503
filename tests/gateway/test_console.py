"""The console's server side in-process: sign-in into an HttpOnly SameSite=Strict cookie, user
keys refused, CSRF on every change, sign-out, revoked keys end sessions, the page's security
headers, garbage input, and admin labelling recorded as feedback of that admin (in SQL).
The page itself is driven in Chromium by ``tests/console/test_console_browser.py``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.traffic_records import TrafficSample
from tests.gateway.conftest import Records, auth


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Records]]:
    records = Records(tmp_path)
    records.adapter("rt")
    settings = GatewaySettings(data_dir=tmp_path, engines=["http://127.0.0.1:9"], redis_url=None)
    with TestClient(create_app(settings)) as c:
        yield c, records


def sign_in(c: TestClient, key: str) -> str:
    r = c.post("/console/session", headers=auth(key))
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    return str(r.json()["csrf"])


def test_sign_in_csrf_and_sign_out(client: tuple[TestClient, Records]) -> None:
    c, records = client
    page = c.get("/console")
    assert page.status_code == 200 and "tunegate console" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/console/static/app.js").status_code == 200
    assert c.get("/console/static/..%2Fsessions.py").status_code == 404

    r = c.post("/console/session", headers=auth(records.key("user")))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert "set-cookie" not in r.headers
    assert c.post("/console/session").status_code == 401
    assert c.post("/console/session", headers=auth("tg-" + "x" * 43)).status_code == 401
    assert c.get("/admin/keys").status_code == 401  # no cookie yet

    csrf = sign_in(c, records.key("admin"))
    assert c.get("/console/session").json()["csrf"] == csrf
    assert c.get("/admin/keys").status_code == 200  # the cookie stands for the admin key
    assert c.get("/console/api/overview").status_code == 200
    # A change without the CSRF token, or with a wrong one, is refused before it happens.
    r = c.post("/admin/keys", json={"name": "nope"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = c.post("/admin/keys", json={"name": "nope"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    assert not [k for k in c.get("/admin/keys").json()["data"] if k["name"] == "nope"]
    r = c.post("/admin/keys", json={"name": "made"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201 and r.json()["key"].startswith("tg-")
    # Sign-out needs the token too, then the cookie is worthless.
    assert c.delete("/console/session").status_code == 403
    assert c.delete("/console/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert c.get("/admin/keys").status_code == 401


def test_a_console_request_looks_its_session_up_once(
    client: tuple[TestClient, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header guard finds the session and its key; the routes' dependencies (and ``GET
    /console/session``) use what it found instead of asking SQL again."""
    c, records = client
    csrf = sign_in(c, records.key("admin"))
    sessions, keys = c.app.state.console_sessions, c.app.state.tg.keys
    seen: list[str] = []
    get, authenticate = sessions.get, keys.authenticate

    def counted_get(token: str) -> Any:
        seen.append("session")
        return get(token)

    async def counted_authenticate(digest: str) -> Any:
        seen.append("key")
        return await authenticate(digest)

    monkeypatch.setattr(sessions, "get", counted_get)
    monkeypatch.setattr(keys, "authenticate", counted_authenticate)
    for method, path, status in (("GET", "/admin/keys", 200), ("GET", "/console/session", 200),
                                 ("POST", "/admin/keys", 201)):
        seen.clear()
        r = c.request(method, path, headers={"X-CSRF-Token": csrf},
                      json={"name": "once"} if method == "POST" else None)
        assert r.status_code == status, r.text
        assert seen == ["session", "key"], (path, seen)


def test_revoking_the_key_ends_its_sessions(client: tuple[TestClient, Records]) -> None:
    c, records = client
    key = records.key("admin")
    csrf = sign_in(c, key)
    mine = c.get("/console/session").json()["key"]["id"]
    other = TestClient(c.app)
    other_csrf = sign_in(other, records.key("admin"))
    assert other.delete(f"/admin/keys/{mine}", headers={"X-CSRF-Token": other_csrf}).is_success
    r = c.get("/admin/keys", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401 and r.json()["error"]["code"] == "session_expired"


def test_admin_labels_are_feedback_of_that_admin(client: tuple[TestClient, Records]) -> None:
    c, records = client
    with records.db.session() as s:
        s.add(
            TrafficSample(
                request_id="req-1",
                key_id="key_client",
                route="/v1/chat/completions",
                model="rt",
                name="rt",
                version=1,
                lane="stable",
                request={"messages": [{"role": "user", "content": "good film"}]},
                output="rotten",
                status=200,
                latency_ms=12.0,
                created_at=dt.datetime.now(dt.UTC),
            )
        )
    csrf = sign_in(c, records.key("admin"))
    me = c.get("/console/session").json()["key"]["id"]
    listed = c.get("/console/api/traffic", params={"model": "rt", "labelled": "no"}).json()
    [row] = listed["data"]
    assert row["prompt"] == "good film" and row["label"] is None
    for garbage in ({}, {"label": ""}, {"label": "x" * 201}, {"score": 2}, [1, 2], "{"):
        r = c.post(
            f"/console/api/traffic/{row['id']}/feedback",
            json=garbage,
            headers={"X-CSRF-Token": csrf},
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert c.get("/console/api/traffic/99999").status_code == 404
    assert c.get("/console/api/traffic", params={"model": "bad name!"}).status_code == 400
    assert c.get("/console/api/traffic", params={"limit": 10_000}).status_code == 400
    r = c.post(
        f"/console/api/traffic/{row['id']}/feedback",
        json={"label": "fresh"},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.status_code == 200 and r.json()["feedback_by"] == me
    with records.db.session() as s:
        got = s.query(TrafficSample).filter_by(request_id="req-1").one()
        assert (got.label, got.feedback_key_id) == ("fresh", me)
    out = c.get("/console/api/traffic/export", params={"model": "rt", "kind": "golden"})
    assert out.status_code == 200 and out.headers["x-tunegate-records"] == "1"
    assert '"content": "fresh"' in out.text
