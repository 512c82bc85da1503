"""``tunegate adapters``: list, show, promote and rollback through the real command line, on a
temporary data folder (SQLite registry and local artifact store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.db import Database
from shared.registry import Registry
from shared.settings import StorageSettings


def tunegate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
           "TUNEGATE_ARTIFACT_STORE": "", "TUNEGATE_ARTIFACT_STORE_OPTIONS": "{}"}
    return subprocess.run([sys.executable, "-m", "tunegate", "adapters", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Two versions of ``sent``: v1 promoted to stable, then v2."""
    db = Database(StorageSettings(data_dir=tmp_path).db_url)
    reg = Registry.from_settings(db, StorageSettings(data_dir=tmp_path))
    for i in (1, 2):
        d = Path(reg.store.root) / f"staging/{i}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_text(f"weights {i}")
        reg.register_version("sent", f"staging/{i}", {"job_id": f"job-{i}",
                                                      "metrics": {"golden_score": 0.8 + i / 10}})
        if i == 1:
            reg.set_alias("sent", "stable", 1, reason="gate passed")
    db.dispose()
    return tmp_path


def test_list_and_show(data_dir: Path) -> None:
    out = tunegate(data_dir, "list")
    assert out.returncode == 0, out.stderr
    assert "sent  versions=2  latest=v2 stable=v1" in out.stdout
    rows = json.loads(tunegate(data_dir, "list", "--json").stdout)
    assert rows == [{"name": "sent", "versions": 2, "aliases": {"latest": 2, "stable": 1}}]
    show = tunegate(data_dir, "show", "sent")
    assert show.returncode == 0, show.stderr
    assert "sent@v1" in show.stdout and "sent@v2" in show.stdout and "job=job-2" in show.stdout
    assert "golden=1.000" in show.stdout and "(gate passed)" in show.stdout


def test_promote_then_rollback_walks_the_alias_back(data_dir: Path) -> None:
    out = tunegate(data_dir, "promote", "sent@v2", "--alias", "stable")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sent:stable -> sent@v2"
    settings = StorageSettings(data_dir=data_dir)
    reg = Registry.from_settings(Database(settings.db_url), settings)
    assert reg.resolve("sent").ref == "sent@v2"
    out = tunegate(data_dir, "rollback", "sent")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sent:stable -> sent@v1"
    assert reg.resolve("sent").ref == "sent@v1"
    kinds = [h["kind"] for h in json.loads(tunegate(data_dir, "show", "sent", "--json").stdout)
             ["history"] if h["alias"] == "stable"]
    assert kinds == ["set", "set", "rollback"]
    # Nothing before v1's first promotion: a clear error, exit status 2.
    out = tunegate(data_dir, "rollback", "sent")
    assert out.returncode == 2 and "no earlier version" in out.stderr


def test_bad_input_is_a_clear_error(data_dir: Path) -> None:
    for args, message in (
        (("show", "nope"), "no adapter 'nope'"),
        (("promote", "sent@v9"), "no version sent@v9"),
        (("promote", "sent"), "is not NAME@vN"),
        (("promote", "sent@v1", "--alias", "Bad Alias"), "invalid alias"),
    ):
        out = tunegate(data_dir, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr
        assert "Traceback" not in out.stderr
