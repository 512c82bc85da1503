"""The local artifact store never follows a symlink out of its root: a staged folder that is, or
contains, a symlink is refused before anything is hashed or moved, and an upload with one is
refused too. Real folders, real registry on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.db import Database, database_url
from shared.errors import InvalidRequest
from shared.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(Database(database_url(tmp_path)), str(tmp_path / "artifacts"))


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (outside / "private.key").write_text("not for the store")
    return outside


def test_a_staged_folder_that_is_a_symlink_is_refused(reg: Registry, secret_dir: Path) -> None:
    staging = Path(reg.store.root) / "staging"
    staging.mkdir(parents=True)
    (staging / "evil").symlink_to(secret_dir, target_is_directory=True)
    with pytest.raises(InvalidRequest):
        reg.register_version("leak", "staging/evil", {})
    assert sorted(p.name for p in secret_dir.iterdir()) == ["adapter_config.json", "private.key"]
    assert reg.list_adapters() == []


def test_a_symlink_inside_a_staged_folder_is_refused(reg: Registry, secret_dir: Path) -> None:
    folder = Path(reg.store.root) / "staging" / "job"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").symlink_to(secret_dir / "private.key")
    with pytest.raises(InvalidRequest):
        reg.register_version("leak", "staging/job", {})
    assert (secret_dir / "private.key").read_text() == "not for the store"
    assert not (Path(reg.store.root) / "adapters" / "leak").exists() and reg.list_adapters() == []


def test_an_upload_with_a_symlink_is_refused(reg: Registry, secret_dir: Path,
                                             tmp_path: Path) -> None:
    local = tmp_path / "trained"
    local.mkdir()
    (local / "adapter_config.json").write_text("{}")
    (local / "adapter_model.safetensors").symlink_to(secret_dir / "private.key")
    with pytest.raises(InvalidRequest):
        reg.store.upload(local, "staging/up")
    assert not (Path(reg.store.root) / "staging" / "up").exists()
