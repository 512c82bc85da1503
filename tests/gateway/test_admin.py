"""The admin API: every admin route refuses user keys; keys, adapters, aliases, replicas."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.conftest import Records, auth, chat, fake_replica, gateway


@pytest.fixture(scope="module")
def gw(data_dir: Path) -> Iterator[str]:
    with fake_replica("r1") as (engine, _), gateway(data_dir, [engine]) as url:
        yield url


@pytest.fixture(scope="module")
def admin(records: Records) -> str:
    return records.key("admin")


# Everything else in the route table needs the admin scope (a new user-facing route must be
# added here on purpose, or this test fails).
PUBLIC = {"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json",
          "/docs/oauth2-redirect", "/console", "/console/static/{name}"}  # the page, no data
USER = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/generate", "/v1/feedback"}


def admin_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app's route table (read through its OpenAPI schema: FastAPI's
    public view of the table; only the console's page and files, public, are left out of it)
    that is neither public nor a user route."""
    app = create_app(GatewaySettings(engines=["http://127.0.0.1:1"]))
    out = []
    for path, methods in app.openapi()["paths"].items():
        if path in PUBLIC or path in USER:
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        out += [(m.upper(), concrete) for m in sorted(methods)]
    return out


def test_every_admin_route_refuses_user_keys(gw: str, records: Records) -> None:
    routes = admin_routes()
    assert sum(p.startswith("/admin/") for _, p in routes) >= 12  # keys, adapters, replicas
    user = records.key("user")
    for method, path in routes:
        r = httpx.request(method, gw + path, headers=auth(user), json={})
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
        r = httpx.request(method, gw + path, json={})
        assert r.status_code == 401, (method, path, r.text)


def test_keys_crud(gw: str, admin: str) -> None:
    r = httpx.post(gw + "/admin/keys", headers=auth(admin),
                   json={"name": "svc", "scope": "user", "models": ["base"], "rpm": 100})
    assert r.status_code == 201
    created = r.json()
    secret, key_id = created["key"], created["id"]
    assert chat(gw, secret).status_code == 200
    listed = httpx.get(gw + "/admin/keys", headers=auth(admin)).json()["data"]
    entry = next(k for k in listed if k["id"] == key_id)
    assert "key" not in entry and "key_hash" not in entry and entry["rpm"] == 100
    assert secret not in httpx.get(gw + "/admin/keys", headers=auth(admin)).text
    assert httpx.delete(f"{gw}/admin/keys/{key_id}", headers=auth(admin)).status_code == 200
    assert chat(gw, secret).status_code == 401  # revoked, same process: at once
    assert httpx.get(f"{gw}/admin/keys/nope", headers=auth(admin)).status_code == 404
    r = httpx.post(gw + "/admin/keys", headers=auth(admin), json={"name": "x", "scope": "god"})
    assert r.status_code == 400


@pytest.mark.parametrize("path", ["/etc", "../../etc", "staging/../../x", "file:///etc",
                                  "adapters/x/v1", "no/such/folder"])
def test_register_refuses_paths_outside_the_store(gw: str, admin: str, path: str) -> None:
    r = httpx.post(gw + "/admin/adapters/evil/versions", headers=auth(admin),
                   json={"path": path})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "path"


def test_register_alias_rollback_route_requests(gw: str, admin: str, records: Records) -> None:
    store = Path(records.registry.store.root)
    refs = []
    for i in (1, 2):
        d = store / f"staging/flow{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(f'{{"v": {i}}}')
        r = httpx.post(gw + "/admin/adapters/flow/versions", headers=auth(admin),
                       json={"path": f"staging/flow{i}", "manifest": {"rank": 8}})
        assert r.status_code == 201, r.text
        refs.append(r.json()["id"])
        r = httpx.put(f"{gw}/admin/adapters/flow/aliases/stable", headers=auth(admin),
                      json={"version": f"v{i}", "reason": "test"})
        assert r.status_code == 200, r.text
    assert refs == ["flow@v1", "flow@v2"]
    assert chat(gw, admin, model="flow").json()["model"] == "flow@v2"
    r = httpx.post(f"{gw}/admin/adapters/flow/aliases/stable/rollback", headers=auth(admin))
    assert r.json()["version"] == 1
    assert chat(gw, admin, model="flow").json()["model"] == "flow@v1"
    detail = httpx.get(f"{gw}/admin/adapters/flow", headers=auth(admin)).json()
    assert detail["aliases"] == {"latest": 2, "stable": 1}
    assert detail["versions"][0]["manifest"]["rank"] == 8
    hist = httpx.get(f"{gw}/admin/adapters/flow/aliases", headers=auth(admin)).json()["history"]
    assert [h["kind"] for h in hist if h["alias"] == "stable"] == ["set", "set", "rollback"]
    v = httpx.get(f"{gw}/admin/adapters/flow/versions/v2", headers=auth(admin)).json()
    assert v["content_hash"] and v["path"].endswith("adapters/flow/v2")
    names = [a["name"] for a in httpx.get(gw + "/admin/adapters", headers=auth(admin))
             .json()["data"]]
    assert "flow" in names
    r = httpx.post(f"{gw}/admin/adapters/flow/aliases/stable/rollback", headers=auth(admin))
    assert r.status_code == 409


def test_replicas_status(gw: str, admin: str, records: Records) -> None:
    ref = records.adapter("held")
    assert chat(gw, admin, model="held").status_code == 200
    data = httpx.get(gw + "/admin/replicas", headers=auth(admin)).json()["data"]
    assert data[0]["healthy"] is True and ref in data[0]["adapters"]
    assert data[0]["base_model"] == "fake-base"
