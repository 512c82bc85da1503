"""Gateway test helpers: fake replicas (bench/fake_upstream.py) and gateway processes."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import KeyStore
from shared.db import Database, database_url
from shared.registry import Registry
from tests.procs import free_port, run_server

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "bench" / "fake_upstream.py"


@contextlib.contextmanager
def fake_replica(name: str, load_delay_s: float = 0.0) -> Iterator[tuple[str, object]]:
    port = free_port()
    with run_server([sys.executable, str(FAKE), "--port", str(port), "--name", name,
                     "--load-delay", str(load_delay_s)], port=port, timeout_s=30) as (url, proc):
        yield url, proc


@contextlib.contextmanager
def gateway(data_dir: Path, engines: list[str], redis_url: str | None = None,
            log: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    env = {"TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
           "TUNEGATE_ARTIFACT_STORE": "", "REDIS_URL": redis_url or "",
           "TUNEGATE_GATEWAY_REDIS_URL": redis_url or "",
           "TUNEGATE_GATEWAY_ENGINES": ",".join(engines),
           "TUNEGATE_GATEWAY_HEALTH_INTERVAL_S": "0.3", "TUNEGATE_GATEWAY_CACHE_TTL_S": "0.2",
           **(env or {})}  # the caller's settings win
    with run_server([sys.executable, "-m", "tunegate", "gateway", "serve", "--port", str(port)],
                    port=port, env=env, timeout_s=60, log=log) as (url, _):
        yield url


class Records:
    """Keys and adapters written straight to the gateway's database and store."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.db = Database(database_url(data_dir))
        self.keys = KeyStore(self.db)
        self.registry = Registry(self.db, str(data_dir / "artifacts"))

    def key(self, scope: str = "user", **kw: Any) -> str:
        secret, _ = self.keys.create(name=f"test-{uuid.uuid4().hex[:6]}", scope=scope, **kw)
        return secret

    def adapter(self, name: str, *, stable: bool = True) -> str:
        rel = f"staging/{uuid.uuid4().hex}"
        d = Path(self.registry.store.root) / rel
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps({"name": name, "n": rel}))
        v = self.registry.register_version(name, rel, {"test": True})
        if stable:
            self.registry.set_alias(name, "stable", v.version)
        return v.ref


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture(scope="module")
def records(data_dir: Path) -> Records:
    return Records(data_dir)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(base: str, key: str, model: str = "base", content: str = "hi",
         **extra: object) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=auth(key), timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": content}],
                            **extra})


def fresh_window(redis_url: str) -> None:
    """Quota windows are whole minutes of Redis' clock: start a check early in one, so that no
    window boundary falls inside the few seconds a test takes."""
    import redis

    r = redis.Redis.from_url(redis_url)
    seconds = r.time()[0] % 60  # type: ignore[index]
    r.close()
    if seconds > 45:
        time.sleep(60 - seconds + 0.5)
