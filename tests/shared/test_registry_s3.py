"""The adapter registry on an S3-compatible store: a real moto server (``moto_server``) on a free
port, reached through fsspec/s3fs with the endpoint in ``TUNEGATE_ARTIFACT_STORE_OPTIONS``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.db import Database
from shared.errors import Conflict, ModelNotFound
from shared.registry import MANIFEST_FILE, Registry
from shared.settings import StorageSettings
from tests.procs import free_port, run_server

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    with run_server(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port=port,
                    health_path="/moto-api/", timeout_s=60) as (base, _):
        yield base


@pytest.fixture
def reg(tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Registry:
    # The store as an operator configures it: environment variables read by StorageSettings.
    bucket = f"tunegate-{tmp_path.name.lower().replace('_', '-')[:40]}"
    monkeypatch.setenv("TUNEGATE_ARTIFACT_STORE", f"s3://{bucket}/store")
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    monkeypatch.setenv("TUNEGATE_ARTIFACT_STORE_OPTIONS", json.dumps(options))
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)  # the operator's bucket
    settings = StorageSettings(data_dir=tmp_path)
    assert settings.store_url == f"s3://{bucket}/store"
    return Registry.from_settings(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"), settings)


def stage(reg: Registry, rel: str, payload: str) -> str:
    base = f"{reg.store.root}/{rel}"
    reg.store.fs.pipe({f"{base}/adapter_config.json": json.dumps({"r": 8}).encode(),
                       f"{base}/adapter_model.safetensors": payload.encode()})
    return rel


def test_register_resolve_rollback_on_s3(reg: Registry, tmp_path: Path) -> None:
    v1 = reg.register_version("sent", stage(reg, "staging/a", "one"), {"rank": 8})
    assert v1.ref == "sent@v1" and v1.path.startswith("s3://")
    # moved, not copied
    assert not reg.store.fs.exists(f"{reg.store.root}/staging/a/adapter_config.json")
    manifest = json.loads(reg.store.fs.cat(f"{reg.store.root}/adapters/sent/v1/{MANIFEST_FILE}"))
    assert manifest["content_hash"] == v1.content_hash and manifest["rank"] == 8
    # Same content again: the same version, nothing moves.
    again = reg.register_version("sent", stage(reg, "staging/a2", "one"), {})
    assert again.version == 1

    v2 = reg.register_version("sent", stage(reg, "staging/b", "two"), {})
    assert v2.version == 2 and v2.content_hash != v1.content_hash
    assert reg.resolve("sent:latest").ref == "sent@v2"
    with pytest.raises(ModelNotFound):
        reg.resolve("sent")
    reg.set_alias("sent", "stable", 1)
    reg.set_alias("sent", "stable", 2)
    assert reg.resolve("sent").path == v2.path
    assert reg.rollback("sent") == 1
    assert reg.resolve("sent").ref == "sent@v1"
    with pytest.raises(Conflict):
        reg.rollback("sent")

    # Engines load from a local folder: the version is downloaded once into a cache.
    local = reg.materialize("sent", tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_text() == "one"
    assert json.loads((local / MANIFEST_FILE).read_text())["version"] == 1
    assert reg.materialize("sent@v1", tmp_path / "cache") == local
    assert not list((tmp_path / "cache").glob("adapters/sent/.*tmp*"))


def test_local_store_materializes_in_place(tmp_path: Path) -> None:
    reg = Registry(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"), str(tmp_path / "store"))
    (tmp_path / "store/staging/a").mkdir(parents=True)
    (tmp_path / "store/staging/a/adapter_model.safetensors").write_text("w")
    v = reg.register_version("sent", "staging/a", {})
    assert reg.materialize("sent:latest", tmp_path / "cache") == Path(v.path)
    assert not (tmp_path / "cache").exists()
