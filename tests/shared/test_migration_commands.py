"""Migrations from the command line: ``tunegate db`` on SQLite, processes (CLI, gateway, worker,
``up``) refusing a PostgreSQL schema that is behind until told to migrate, ``alembic`` run from
the checkout, and the wheel carrying the revisions."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import sqlalchemy as sa

from shared import migrate
from shared.db import database_url
from tests.procs import free_port
from tests.shared.migration_fixtures import ROOT, T0, pg_schema, previous_database


def _tunegate(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunegate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        cwd=ROOT,
    )


def test_processes_on_postgresql_behind_refuse_until_migrated(tmp_path: Path) -> None:
    with pg_schema() as pg:
        previous_database(pg)
        env = {"TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": pg}
        refused = _tunegate(["keys", "list"], env)
        assert refused.returncode == 2, refused.stderr
        assert "tunegate db upgrade" in refused.stderr and "Traceback" not in refused.stderr
        # The gateway refuses to start, saying what to run.
        port = free_port()
        gw = _tunegate(["gateway", "serve", "--port", str(port)], env, timeout=60)
        assert gw.returncode == 2 and "tunegate db upgrade" in gw.stderr
        worker = _tunegate(["trainer", "worker"], {**env, "REDIS_URL": "redis://127.0.0.1:1/0"})
        assert worker.returncode == 2 and "tunegate db upgrade" in worker.stderr
        up = _tunegate(["up", "--port", str(free_port()), "--engine-port", str(free_port())], env)
        assert up.returncode == 2 and "tunegate db upgrade" in up.stderr
        assert not (tmp_path / "redis").exists()  # refused before starting anything
        ports = ["--port", str(free_port()), "--engine-port", str(free_port())]
        distributed = _tunegate(["up", "--distributed", *ports], env)
        assert distributed.returncode == 2 and "tunegate db upgrade" in distributed.stderr
        assert not (tmp_path / "redis").exists() and not (tmp_path / "models").exists()
        # An engine-side tool reading the registry (parity resolves NAME:alias) refuses too.
        golden = tmp_path / "golden.jsonl"
        golden.write_text(
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "yes"}]}\n'
        )
        parity = _tunegate(["parity", "sent:stable", "--golden", str(golden)], env)
        assert parity.returncode == 2 and "tunegate db upgrade" in parity.stderr
        current = _tunegate(["db", "current"], env)
        assert current.returncode == 1 and "before schema migrations" in current.stdout

        allowed = _tunegate(
            ["keys", "list", "--json"], {**env, "TUNEGATE_DATABASE_AUTO_MIGRATE": "true"}
        )
        assert allowed.returncode == 0, allowed.stderr
        assert "key-0" in allowed.stdout
        assert _tunegate(["db", "current"], env).returncode == 0


def test_downgrade_refused_by_the_data_changes_nothing(tmp_path: Path) -> None:
    """A request id longer than the previous revision's 64 characters: `tunegate db downgrade`
    on PostgreSQL says so in one line, exit 2, and the database stays at head."""
    with pg_schema() as pg:
        env = {"TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": pg}
        assert _tunegate(["db", "upgrade"], env).returncode == 0
        engine = sa.create_engine(pg)
        with engine.begin() as conn:
            conn.execute(sa.insert(migrate.first_schema().tables["traffic_samples"]), [dict(
                request_id="r" * 100, route="/v1/chat/completions", model="m", name="m",
                lane="live", request={}, output="", status=200, latency_ms=1.0,
                created_at=T0,
            )])
        previous = migrate.script().get_revision(migrate.head_revision()).down_revision
        done = _tunegate(["db", "downgrade", str(previous)], env)
        assert done.returncode == 2 and done.stderr.startswith("tunegate db: "), done.stderr
        assert "too long" in done.stderr and "Traceback" not in done.stderr
        assert migrate.status(engine).at_head
        engine.dispose()


def test_db_commands_on_sqlite(tmp_path: Path) -> None:
    env = {"TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": ""}
    head = migrate.head_revision()
    assert _tunegate(["db", "current"], env).returncode == 1  # no tables: behind
    up = _tunegate(["db", "upgrade", migrate.FIRST_REVISION], env)
    assert up.returncode == 0 and f"revision {migrate.FIRST_REVISION}" in up.stdout
    assert _tunegate(["db", "upgrade"], env).returncode == 0
    # Garbage: one line and exit 2, no traceback, nothing changed.
    for bad in (["db", "downgrade", "no-such-rev"], ["db", "current", "--url", "garbage://x"]):
        done = _tunegate(bad, env)
        assert done.returncode == 2 and done.stderr.startswith("tunegate db: "), done.stderr
        assert "Traceback" not in done.stderr
    down = _tunegate(["db", "downgrade", migrate.FIRST_REVISION], env)
    assert down.returncode == 0 and f"revision {migrate.FIRST_REVISION}" in down.stdout
    # Any process opening the embedded database upgrades it.
    assert _tunegate(["keys", "list"], env).returncode == 0
    now = _tunegate(["db", "current"], env)
    assert now.returncode == 0 and f"revision {head}" in now.stdout


def test_the_package_carries_the_migrations(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("tunegate-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "shared" / "migrations").rglob("*")
        if p.is_file() and p.suffix in (".py", ".mako")
    }
    assert shipped and shipped <= names


def test_alembic_command_line_from_the_repository(tmp_path: Path) -> None:
    """`alembic` run from the checkout finds the revisions (pyproject's [tool.alembic]) and the
    settings' database, and autogenerate compares against the models."""
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": ""}
    alembic = [sys.executable, "-m", "alembic"]
    for args in (["upgrade", "head"], ["check"]):
        done = subprocess.run(
            [*alembic, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
    engine = sa.create_engine(database_url(tmp_path))
    assert migrate.status(engine).at_head
    checks = sa.inspect(engine).get_check_constraints("api_keys")
    assert [c["name"] for c in checks] == ["ck_api_keys_sample_rate"]
    engine.dispose()
