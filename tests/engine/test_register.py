"""``tunegate engine serve --register``: engines register themselves with a real gateway process.

- vllm kind: the real CLI path (registrar process spawned, then ``exec``) with a stand-in for
  vLLM's interpreter that execs the fake replica (bench/fake_upstream.py) on the asked port; the
  registrar re-registers after the gateway forgets it and deregisters once the engine is gone.
- embedded kind: a real embedded engine (real SmolLM2) registers from its lifespan, serves a chat
  through the gateway and deregisters on shutdown.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.register import admin_key, advertise_url
from tests.gateway.conftest import FAKE, Records, auth, chat, gateway
from tests.procs import free_port, run_server, stop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw-register")


@pytest.fixture(scope="module")
def admin(data_dir: Path) -> str:
    return Records(data_dir).key("admin")


@pytest.fixture(scope="module")
def gw(data_dir: Path) -> Iterator[str]:
    with gateway(data_dir, []) as url:  # no static replica: only registered ones
        yield url


def replicas(base: str, key: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{base}/admin/replicas", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return {item["url"]: item for item in r.json()["data"]}


def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def registrars_for(url: str) -> list[int]:
    """PIDs of registrar processes (``python -m engine.register``) for ``url``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.register" in args and url.encode() in args:
            pids.append(int(proc.name))
    return pids


def fake_vllm_python(folder: Path) -> Path:
    """Stands in for vLLM's python: ``python -m vllm... --port P ...`` execs the fake replica on
    P (as vLLM's own server would serve there)."""
    path = folder / "python"
    path.write_text(
        "#!/bin/sh\nport=''\n"
        'while [ $# -gt 0 ]; do [ "$1" = --port ] && port="$2"; shift; done\n'
        f'exec {sys.executable} {FAKE} --port "$port" --name vllm-fake\n')
    path.chmod(0o755)
    return path


def test_advertise_url_defaults() -> None:
    assert advertise_url("0.0.0.0", 8001) == "http://127.0.0.1:8001"
    assert advertise_url("::", 8001) == "http://127.0.0.1:8001"
    assert advertise_url("10.0.0.5", 9000) == "http://10.0.0.5:9000"
    assert advertise_url("::1", 9000) == "http://[::1]:9000"


def test_admin_key_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEGATE_ENGINE_REGISTER_KEY", raising=False)
    assert admin_key(data_dir=tmp_path) is None
    (tmp_path / "local-admin.key").write_text("tg-file\n")
    assert admin_key(data_dir=tmp_path) == "tg-file"
    monkeypatch.setenv("TUNEGATE_ENGINE_REGISTER_KEY", "tg-env")
    assert admin_key(data_dir=tmp_path) == "tg-env"
    assert admin_key("tg-flag", data_dir=tmp_path) == "tg-flag"


def test_vllm_kind_registers_reregisters_and_deregisters(gw: str, admin: str,
                                                         tmp_path: Path) -> None:
    fake_vllm = fake_vllm_python(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TUNEGATE_VLLM_PYTHON": str(fake_vllm), "TUNEGATE_VLLM_DEVICE": "cpu",
           "TUNEGATE_ENGINE_REGISTER_KEY": admin, "TUNEGATE_ENGINE_REGISTER_INTERVAL_S": "0.5"}
    with run_server(["-m", "tunegate", "engine", "serve", "--kind", "vllm", "--model",
                     str(tmp_path), "--port", str(port), "--register", gw],
                    port=port, env=env, timeout_s=60,
                    log=tmp_path / "engine.log") as (_, proc):
        eventually(lambda: replicas(gw, admin).get(url, {}).get("healthy") is True)
        assert replicas(gw, admin)[url]["kind"] == "vllm"
        r = chat(gw, admin)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("vllm-fake|")
        assert len(registrars_for(url)) == 1

        # The gateway forgets it (an operator deletes it, a database is reset): it comes back.
        r = httpx.delete(f"{gw}/admin/replicas", headers=auth(admin), params={"url": url})
        assert r.status_code == 200, r.text
        eventually(lambda: url in replicas(gw, admin), timeout_s=5)

        stop(proc)  # the engine's process group; the registrar runs in a session of its own
    eventually(lambda: url not in replicas(gw, admin), timeout_s=10)
    eventually(lambda: not registrars_for(url), timeout_s=10)
    assert "deregistered" in (tmp_path / "engine.log").read_text()


def test_unreachable_gateway_is_not_fatal(admin: str, tmp_path: Path) -> None:
    """The registrar keeps retrying a gateway that is not there; the engine serves on."""
    fake_vllm = fake_vllm_python(tmp_path)
    port = free_port()
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {"TUNEGATE_VLLM_PYTHON": str(fake_vllm), "TUNEGATE_VLLM_DEVICE": "cpu",
           "TUNEGATE_ENGINE_REGISTER_KEY": admin}
    log = tmp_path / "engine.log"
    with run_server(["-m", "tunegate", "engine", "serve", "--kind", "vllm", "--model",
                     str(tmp_path), "--port", str(port), "--register", nowhere],
                    port=port, env=env, timeout_s=60, log=log) as (base, proc):
        eventually(lambda: "registering" in log.read_text() and "failed" in log.read_text())
        assert proc.poll() is None
        assert httpx.get(base + "/health").status_code == 200
    eventually(lambda: not registrars_for(f"http://127.0.0.1:{port}"), timeout_s=10)


def test_missing_key_is_refused_before_start(tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("TUNEGATE_ENGINE_REGISTER_KEY", None)
    r = subprocess.run([sys.executable, "-m", "tunegate", "engine", "serve", "--kind", "vllm",
                        "--register", "http://127.0.0.1:1"], env=env, capture_output=True,
                       timeout=60)
    assert r.returncode == 2
    assert b"no admin key" in r.stderr


def test_embedded_engine_registers_and_deregisters(gw: str, admin: str, default_model_dir: Path,
                                                   tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "engine.log"
    with run_server(["-m", "tunegate", "engine", "serve", "--model", str(default_model_dir),
                     "--host", "0.0.0.0", "--port", str(port), "--max-model-len", "512",
                     "--max-num-seqs", "4", "--register", gw],
                    env={"TUNEGATE_ENGINE_REGISTER_KEY": admin}, port=port, timeout_s=240,
                    log=log) as (_, proc):
        eventually(lambda: replicas(gw, admin).get(url, {}).get("healthy") is True)
        assert replicas(gw, admin)[url]["kind"] == "embedded"
        r = chat(gw, admin, max_tokens=4)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        stop(proc)  # SIGTERM: the lifespan's shutdown deregisters
        assert "Application shutdown complete" in log.read_text()
    assert url not in replicas(gw, admin)
