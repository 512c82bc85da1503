"""Closed engines: the embedded engine takes a shared secret like vLLM's ``--api-key`` (every
``/v1`` path needs it, ``/health`` stays open; 401 in OpenAI's shape), the gateway sends it on
every engine call, and an engine registers itself with a narrow ``engine`` key that can do
nothing else. Real engine (SmolLM2), real gateway, the engine's own ``--register``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engine.test_register import eventually, replicas
from tests.gateway.conftest import Records, auth, chat, gateway
from tests.procs import free_port, run_server

SECRET = "engine-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory,
           default_model_dir: Path) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("engine-auth")
    records = Records(data_dir)
    admin, user = records.key("admin"), records.key("user")
    engine_key = records.key("engine")
    port = free_port()
    with gateway(data_dir, [], env={"TUNEGATE_GATEWAY_ENGINE_API_KEY": SECRET}) as gw, \
            run_server(["-m", "tunegate", "engine", "serve", "--model", str(default_model_dir),
                        "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "4",
                        "--register", gw],
                       env={"TUNEGATE_ENGINE_API_KEY": SECRET,
                            "TUNEGATE_ENGINE_REGISTER_KEY": engine_key},
                       port=port, timeout_s=240,
                       log=data_dir / "engine.log") as (engine, _):
        eventually(lambda: replicas(gw, admin).get(engine, {}).get("healthy") is True, 60)
        yield {"gw": gw, "engine": engine, "admin": admin, "user": user,
               "engine_key": engine_key}


def test_engine_refuses_calls_without_the_secret(system: dict[str, Any], tmp_path: Path) -> None:
    engine = system["engine"]
    assert httpx.get(engine + "/health", timeout=10).status_code == 200  # open, as in vLLM
    calls = [("GET", "/v1/models", None),
             ("POST", "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 1}),
             ("POST", "/v1/chat/completions",
              {"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
             ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                    {"Authorization": f"Bearer {SECRET}x"}):
        for method, path, body in calls:
            r = httpx.request(method, engine + path, json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    ok = httpx.get(engine + "/v1/models", headers=auth(SECRET), timeout=10)
    assert ok.status_code == 200


def test_the_gateway_sends_the_secret(system: dict[str, Any]) -> None:
    r = chat(system["gw"], system["user"], max_tokens=3)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_an_engine_key_only_registers_replicas(system: dict[str, Any]) -> None:
    gw, key = system["gw"], system["engine_key"]
    url = f"http://127.0.0.1:{free_port()}"
    r = httpx.post(gw + "/admin/replicas", headers=auth(key), json={"url": url}, timeout=30)
    assert r.status_code == 201, r.text
    gone = httpx.delete(gw + "/admin/replicas", params={"url": url}, headers=auth(key),
                        timeout=30)
    assert gone.status_code == 200, gone.text
    for method, path, body in [
            ("POST", "/v1/chat/completions",
             {"model": "base", "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/v1/completions", {"model": "base", "prompt": "hi"}),
            ("GET", "/v1/models", None),
            ("POST", "/v1/feedback", {"request_id": "x", "label": "y"}),
            ("GET", "/admin/replicas", None),
            ("POST", "/admin/replicas/check", None),
            ("GET", "/admin/keys", None),
            ("POST", "/admin/keys", {"name": "x", "scope": "admin"}),
            ("GET", "/admin/adapters", None),
            ("GET", "/v1/fine_tuning/jobs", None)]:
        r = httpx.request(method, gw + path, json=body, headers=auth(key), timeout=30)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
    # A user key cannot register replicas either.
    r = httpx.post(gw + "/admin/replicas", headers=auth(system["user"]), json={"url": url},
                   timeout=30)
    assert r.status_code == 403
