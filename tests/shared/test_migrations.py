"""Schema migrations on real SQLite and a real PostgreSQL (127.0.0.1:5432, database ``test``, a
schema per test): databases made before migrations are adopted with every row kept, revisions go
down and up again, the models agree with the head revision, and concurrent starts migrate once.
The command lines (``tunegate db``, processes refusing a schema behind, ``alembic``, the wheel)
are tested in ``test_migration_commands.py``."""

from __future__ import annotations

import subprocess
import sys
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
from tests.shared.migration_fixtures import ROOT, SECRET, T0, pg_schema, previous_database, snapshot


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield database_url(tmp_path)
        return
    with pg_schema() as pg:
        yield pg


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
    before = previous_database(url)
    assert migrate.status(sa.create_engine(url)).unversioned
    db = _open(url)
    st = migrate.status(db.engine)
    assert st.at_head and st.current == migrate.head_revision()
    assert snapshot(url, before) == before  # every row of every table, every value
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
    assert snapshot(url, before) == before
    migrate.upgrade(db.engine)
    assert migrate.status(db.engine).at_head
    assert snapshot(url, before) == before
    assert migrate.differences(db.engine) == []

    migrate.downgrade(db.engine, "base")  # every table goes; an empty database comes back
    assert set(sa.inspect(db.engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(db.engine)
    assert migrate.differences(db.engine) == []
    db.dispose()


def test_previous_release_database_upgraded_rows_kept(url: str, tmp_path: Path) -> None:
    """A filled database at the previous release's head (versioned, one revision behind): a
    process of this release upgrades SQLite, refuses PostgreSQL naming the revision it found, and
    every row survives; the version counter added since never hands out a number in use."""
    before = previous_database(url)
    previous = migrate.script().get_revision(migrate.head_revision()).down_revision
    assert isinstance(previous, str)
    engine = sa.create_engine(url)
    migrate.upgrade(engine, previous)
    assert migrate.status(engine).current == previous
    engine.dispose()
    if url.startswith("postgresql"):
        with pytest.raises(SchemaOutOfDate, match=rf"it has revision {previous}, this code"):
            Database(url)
    db = _open(url)
    assert migrate.status(db.engine).at_head
    assert snapshot(url, before) == before
    assert migrate.differences(db.engine) == []
    reg = Registry(db, str(tmp_path / "store"))
    staged = Path(reg.store.root) / "staging" / "new"
    staged.mkdir(parents=True)
    (staged / "adapter_config.json").write_text("{}")
    (staged / "adapter_model.safetensors").write_text("weights")
    assert reg.register_version("sent", "staging/new", {}).ref == "sent@v4"  # v1-v3 existed
    assert reg.resolve("sent:stable").ref == "sent@v2"
    db.dispose()


def test_first_release_database_gains_columns_and_tables(url: str) -> None:
    before = previous_database(url, first_release=True)
    db = _open(url)
    assert migrate.status(db.engine).at_head
    assert snapshot(url, before) == before
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
