"""Adapters on an S3-compatible store (a real moto server): the gateway downloads a version into
its adapter cache once and hands engines that local folder, never the ``s3://`` URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.db import Database, database_url
from shared.registry import MANIFEST_FILE, Registry
from tests.gateway.conftest import Records, auth, chat, fake_replica, gateway
from tests.procs import free_port, run_server

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, str]]:
    port = free_port()
    with run_server(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port=port,
                    health_path="/moto-api/", timeout_s=60) as (base, _):
        yield {"endpoint_url": base, "key": "testing", "secret": "testing"}


def test_gateway_loads_a_remote_version_from_its_local_cache(
        tmp_path: Path, s3_options: dict[str, str]) -> None:
    store = "s3://tunegate-remote/store"
    s3fs.S3FileSystem(**s3_options, skip_instance_cache=True).mkdir("tunegate-remote")
    registry = Registry(Database(database_url(tmp_path)), store, storage_options=s3_options)
    staged = f"{registry.store.root}/staging/a"
    registry.store.fs.pipe({f"{staged}/adapter_config.json": b'{"r": 8}',
                            f"{staged}/adapter_model.safetensors": b"weights"})
    version = registry.register_version("remote", "staging/a", {})
    registry.set_alias("remote", "stable", version.version)
    admin = Records(tmp_path).key("admin")
    cache = tmp_path / "adapter-cache"
    env = {"TUNEGATE_ARTIFACT_STORE": store,
           "TUNEGATE_ARTIFACT_STORE_OPTIONS": json.dumps(s3_options),
           "TUNEGATE_GATEWAY_ADAPTER_CACHE_DIR": str(cache)}
    with fake_replica("r1") as (replica, _), gateway(tmp_path, [replica], env=env) as gw:
        for _ in range(2):
            r = chat(gw, admin, model="remote")
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "remote@v1"
        models = httpx.get(replica + "/v1/models", headers=auth(admin)).json()["data"]
        roots = {m["id"]: m["root"] for m in models if m.get("parent")}
        stats = httpx.get(replica + "/fake/stats").json()
    local = Path(roots["remote@v1"])
    assert local.is_relative_to(cache)
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((local / MANIFEST_FILE).read_text())["version"] == 1
    assert stats["loads"] == {"remote@v1": 1}
