"""Schema migrations on real SQLite and a real PostgreSQL (127.0.0.1:5432, database ``test``, a
schema per test): databases made before migrations are adopted with every row kept, revisions go
down and up again, the models agree with the head revision, and processes refuse a PostgreSQL
schema that is behind unless told to migrate."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from gateway.auth import KeyStore, hash_key
from shared import migrate
from shared.db import Database, database_url
from shared.job_records import JobStore
from shared.migrate import SchemaOutOfDate
from shared.registry import Registry
from shared.settings import StorageSettings
from tests.procs import free_port
from tests.shared.test_db import PG_URL, _pg_up

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
SECRET = "tg-previous-schema-key"
# Tables that the first release did not have yet (added by create_all at a later start).
LATER_TABLES = {"traffic_samples", "promotions", "promotion_events", "eval_runs", "engine_replicas"}
# api_keys as the first release made it: no sample_rate (added later by hand-built ALTER TABLE).
FIRST_RELEASE_API_KEYS = (
    "CREATE TABLE api_keys (id VARCHAR(40) NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL, "
    "scope VARCHAR(16) NOT NULL, key_hash VARCHAR(64) NOT NULL UNIQUE, prefix VARCHAR(16) NOT "
    "NULL, models JSON, rpm INTEGER, tpm INTEGER, created_at TIMESTAMP WITH TIME ZONE NOT NULL, "
    "revoked_at TIMESTAMP WITH TIME ZONE)"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield database_url(tmp_path)
        return
    with _pg_schema() as pg:
        yield pg


@contextlib.contextmanager
def _pg_schema() -> Iterator[str]:
    """The URL of a fresh schema on the PostgreSQL server, dropped afterwards."""
    if not _pg_up():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    base = database_url(Path("."), PG_URL)
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(base)
    with admin.begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield base + f"?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _rows(n: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Rows for every table of the previous schema (revision 0001's columns)."""
    at = [T0 + dt.timedelta(minutes=i) for i in range(n)]
    return {
        "api_keys": [
            dict(
                id=f"key-{i}",
                name=f"k{i}",
                scope="admin" if i == 0 else "user",
                key_hash=hash_key(SECRET) if i == 0 else f"{i:064d}",
                prefix="tg-pre",
                models=["base", f"m{i}"] if i else None,
                rpm=60 * i or None,
                tpm=None,
                sample_rate=0.5 if i == 1 else None,
                created_at=at[i],
                revoked_at=at[i] if i == 2 else None,
            )
            for i in range(n)
        ],
        "adapters": [dict(name="sent", created_at=T0)],
        "adapter_versions": [
            dict(
                id=i + 1,
                name="sent",
                version=i + 1,
                content_hash=f"{i:064x}",
                artifact=f"sent/v{i + 1}",
                manifest={"rank": 8, "i": i},
                created_at=at[i],
            )
            for i in range(n)
        ],
        "aliases": [
            dict(name="sent", alias="stable", version=2, updated_at=at[1]),
            dict(name="sent", alias="latest", version=3, updated_at=at[2]),
        ],
        "alias_events": [
            dict(
                id=i + 1,
                name="sent",
                alias="stable",
                from_version=i or None,
                to_version=i + 1,
                kind="set",
                reason=None,
                at=at[i],
            )
            for i in range(2)
        ],
        "fine_tuning_jobs": [
            dict(
                id=f"ftjob-{i}",
                status="succeeded",
                model="base",
                name="sent",
                spec={"epochs": i},
                fine_tuned_model=f"sent@v{i + 1}",
                error=None,
                result={"score": 0.9},
                trained_tokens=100 * i,
                created_at=at[i],
                started_at=at[i],
                finished_at=at[i],
                heartbeat_at=None,
            )
            for i in range(n)
        ],
        "fine_tuning_events": [
            dict(
                id=i + 1,
                job_id=f"ftjob-{i % n}",
                created_at=at[i % n],
                level="info",
                type="message",
                message=f"step {i}",
                data={"loss": 1.0 / (i + 1)},
            )
            for i in range(2 * n)
        ],
        "files": [
            dict(
                id="file-1",
                filename="train.jsonl",
                purpose="fine-tune",
                bytes=10,
                sha256="0" * 64,
                path="files/file-1",
                report=None,
                created_at=T0,
            )
        ],
        "engine_replicas": [
            dict(url="http://127.0.0.1:9", kind="embedded", registered_at=T0, last_seen=T0)
        ],
        "promotions": [
            dict(
                id=1,
                name="sent",
                version=3,
                baseline=2,
                state="canary",
                shadow_fraction=0.1,
                canary_weight=0.1,
                created_at=T0,
                state_since=T0,
            )
        ],
        "promotion_events": [
            dict(
                id=1,
                promotion_id=1,
                name="sent",
                version=3,
                from_state=None,
                to_state="shadow",
                actor="monitor",
                reason="started",
                metrics={},
                at=T0,
            )
        ],
        "eval_runs": [
            dict(
                id=1,
                name="sent",
                version=3,
                kind="quality",
                n=5,
                score=0.8,
                metrics={"n": 5},
                window_start=T0,
                created_at=T0,
            )
        ],
        "traffic_samples": [
            dict(
                id=i + 1,
                request_id=f"req-{i}",
                trace_id=None,
                key_id="key-1",
                route="/v1/chat/completions",
                model="sent",
                name="sent",
                version=2,
                lane="live",
                request={"messages": []},
                output="ok",
                status=200,
                latency_ms=12.5,
                ttft_ms=None,
                created_at=at[i],
                label="positive" if i == 0 else None,
                score=None,
                corrected_output=None,
                feedback_at=None,
            )
            for i in range(n)
        ],
    }


def _previous_database(url: str, *, first_release: bool = False) -> dict[str, list[dict]]:
    """A database as today's code made it before migrations (revision 0001's tables, frozen),
    filled; ``first_release``: as the first release made it (no sample_rate, fewer tables)."""
    frozen = migrate.first_schema()
    engine = sa.create_engine(url)
    rows = _rows()
    with engine.begin() as conn:
        if first_release:
            ddl = FIRST_RELEASE_API_KEYS
            if engine.dialect.name == "sqlite":
                ddl = ddl.replace("TIMESTAMP WITH TIME ZONE", "DATETIME")
            conn.execute(sa.text(ddl))
            tables = [
                t
                for t in frozen.sorted_tables
                if t.name not in LATER_TABLES and t.name != "api_keys"
            ]
            frozen.create_all(conn, tables=tables)
            for r in rows["api_keys"]:
                r.pop("sample_rate")
            rows = {k: v for k, v in rows.items() if k not in LATER_TABLES}
        else:
            frozen.create_all(conn)
        for table in frozen.sorted_tables:
            if table.name in rows:
                conn.execute(sa.insert(table), rows[table.name])
    engine.dispose()
    return _snapshot(url, rows)


def _snapshot(url: str, tables: dict[str, Any]) -> dict[str, list[dict]]:
    """Every row of ``tables``, as read back (only the columns the previous schema had)."""
    frozen = migrate.first_schema()
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as conn:
        for name, rows in tables.items():
            table = frozen.tables[name]
            cols = [table.c[c] for c in (rows[0] if rows else {})] or list(table.c)
            pk = list(table.primary_key.columns)
            out[name] = [dict(r._mapping) for r in conn.execute(sa.select(*cols).order_by(*pk))]
    engine.dispose()
    return out


def _open(url: str) -> Database:
    """Open as a process does: SQLite migrates itself, PostgreSQL refuses until allowed."""
    if url.startswith("sqlite"):
        return Database(url)
    with pytest.raises(SchemaOutOfDate, match=r"tunegate db upgrade") as refused:
        Database(url)
    assert "TUNEGATE_DATABASE_AUTO_MIGRATE" in str(refused.value)
    return Database(url, auto_migrate=True)


def _unique_violation(db: Database, table: str, row: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        conn.execute(sa.insert(migrate.first_schema().tables[table]), [row])


def test_previous_schema_is_adopted_rows_kept_down_and_up(url: str, tmp_path: Path) -> None:
    before = _previous_database(url)
    assert migrate.status(sa.create_engine(url)).unversioned
    db = _open(url)
    st = migrate.status(db.engine)
    assert st.at_head and st.current == migrate.head_revision()
    assert _snapshot(url, before) == before  # every row of every table, every value
    assert migrate.differences(db.engine) == []  # adopted, upgraded: what the models describe

    # The code reads the adopted rows.
    key = KeyStore(db).lookup(hash_key(SECRET))
    assert key is not None and key.scope == "admin"
    reg = Registry(db, str(tmp_path / "store"))
    assert reg.resolve("sent").ref == "sent@v2"
    assert JobStore(db).list_jobs()[0]["id"] == "ftjob-2"
    # Revision 0002's constraint: one version number per adapter name.
    _unique_violation(
        db,
        "adapter_versions",
        dict(
            id=99,
            name="sent",
            version=1,
            content_hash="f" * 64,
            artifact="x",
            manifest={},
            created_at=T0,
        ),
    )

    # Revision 0002's check, under the name the models give it.
    checks = sa.inspect(db.engine).get_check_constraints("api_keys")
    assert [c["name"] for c in checks] == ["ck_api_keys_sample_rate"]
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE api_keys SET sample_rate = 1.5"))

    migrate.downgrade(db.engine, migrate.FIRST_REVISION)
    assert migrate.status(db.engine).current == migrate.FIRST_REVISION
    assert _snapshot(url, before) == before
    migrate.upgrade(db.engine)
    assert migrate.status(db.engine).at_head
    assert _snapshot(url, before) == before
    assert migrate.differences(db.engine) == []

    migrate.downgrade(db.engine, "base")  # every table goes; an empty database comes back
    assert set(sa.inspect(db.engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(db.engine)
    assert migrate.differences(db.engine) == []
    db.dispose()


def test_first_release_database_gains_columns_and_tables(url: str) -> None:
    before = _previous_database(url, first_release=True)
    db = _open(url)
    assert migrate.status(db.engine).at_head
    assert _snapshot(url, before) == before
    assert migrate.differences(db.engine) == []
    cols = {c["name"] for c in sa.inspect(db.engine).get_columns("api_keys")}
    assert "sample_rate" in cols
    secret, info = KeyStore(db).create(name="new", sample_rate=0.25)
    assert KeyStore(db).lookup(hash_key(secret)) == info and info.sample_rate == 0.25
    # The inline UNIQUE of the first release still holds (named now).
    _unique_violation(
        db,
        "api_keys",
        dict(
            id="dup", name="d", scope="user", key_hash=hash_key(SECRET), prefix="p", created_at=T0
        ),
    )
    db.dispose()


def test_models_agree_with_the_head_revision(url: str) -> None:
    db = Database(url, auto_migrate=True)
    assert migrate.status(db.engine).at_head
    assert migrate.differences(db.engine) == []
    # The check can fail: a column in the models and in no revision is reported.
    changed = sa.MetaData()
    for table in migrate.target_metadata().tables.values():
        table.to_metadata(changed)
    changed.tables["api_keys"].append_column(sa.Column("team", sa.String(40), nullable=True))
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), changed)
    assert [d[0] for d in diffs] == ["add_column"] and diffs[0][3].name == "team"
    db.dispose()


def test_auto_migrate_setting(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEGATE_DATABASE_AUTO_MIGRATE", "false")
    with pytest.raises(SchemaOutOfDate):  # false: never, not even SQLite
        Database(url)
    assert StorageSettings().database_auto_migrate is False
    monkeypatch.setenv("TUNEGATE_DATABASE_AUTO_MIGRATE", "true")
    db = Database(url)  # true: any backend
    assert migrate.status(db.engine).at_head
    db.dispose()
    monkeypatch.setenv("TUNEGATE_DATABASE_AUTO_MIGRATE", "false")
    Database(url).dispose()  # at head: nothing to migrate, nothing refused


def test_a_newer_revision_is_run_on(url: str) -> None:
    db = Database(url, auto_migrate=True)
    with db.engine.begin() as conn:  # as a newer release would leave it
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff0000'"))
    again = Database(url, auto_migrate=False)  # old code keeps working on a newer schema
    assert migrate.status(again.engine).current == "ffff0000"
    again.dispose()
    db.dispose()


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
    with _pg_schema() as pg:
        _previous_database(pg)
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
        current = _tunegate(["db", "current"], env)
        assert current.returncode == 1 and "before schema migrations" in current.stdout

        allowed = _tunegate(
            ["keys", "list", "--json"], {**env, "TUNEGATE_DATABASE_AUTO_MIGRATE": "true"}
        )
        assert allowed.returncode == 0, allowed.stderr
        assert "key-0" in allowed.stdout
        assert _tunegate(["db", "current"], env).returncode == 0


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


def test_concurrent_starts_migrate_once(url: str) -> None:
    """Four processes open one empty database at once (allowed to migrate): one migrates, the
    others wait for its lock and find the work done."""
    code = f"from shared.db import Database; Database({url!r}, auto_migrate=True).dispose()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        assert versions.all() == [migrate.head_revision()]
    assert migrate.differences(engine) == []
    engine.dispose()


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
