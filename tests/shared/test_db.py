"""The SQL layer on a real PostgreSQL (127.0.0.1:5432, database ``test``), and on SQLite."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.auth import KeyStore, hash_key
from shared.db import Database, database_url
from shared.registry import Registry

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), 1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def pg() -> Iterator[Database]:
    if not _pg_up():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    # A schema per test keeps runs independent; search_path points the tables at it.
    schema = "t_" + uuid.uuid4().hex[:10]
    db = Database(database_url(Path("."), PG_URL), create=False)
    with db.engine.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    db.dispose()
    db = Database(database_url(Path("."), PG_URL) + f"?options=-csearch_path%3D{schema}",
                  auto_migrate=True)
    yield db
    db.dispose()
    admin = Database(database_url(Path("."), PG_URL), create=False)
    with admin.engine.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_url_mapping(tmp_path: Path) -> None:
    assert database_url(tmp_path) == f"sqlite:///{tmp_path}/tunegate.db"
    assert database_url(tmp_path, PG_URL).startswith("postgresql+psycopg://")


def _exercise(db: Database, store: Path) -> None:
    keys = KeyStore(db)
    secret, info = keys.create(name="k", scope="user", models=["base"], rpm=5, tpm=100)
    assert keys.lookup(hash_key(secret)) == info
    assert keys.lookup(hash_key(secret + "x")) is None
    keys.revoke(info.id)
    assert keys.lookup(hash_key(secret)) is None
    reg = Registry(db, str(store))
    src = store / "staging" / "a"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 4}))
    v = reg.register_version("sent", "staging/a", {"nested": {"a": [1, 2]}})
    reg.set_alias("sent", "stable", v.version)
    assert reg.resolve("sent").ref == "sent@v1"
    assert reg.get_version("sent", 1).manifest["nested"] == {"a": [1, 2]}


def test_records_on_postgresql(pg: Database, tmp_path: Path) -> None:
    assert pg.engine.dialect.name == "postgresql"
    _exercise(pg, tmp_path / "store")


def test_records_on_sqlite(tmp_path: Path) -> None:
    db = Database(database_url(tmp_path))
    assert db.engine.dialect.name == "sqlite"
    _exercise(db, tmp_path / "store")


def test_an_old_api_keys_table_is_adopted(tmp_path: Path) -> None:
    old = Database(database_url(tmp_path), create=False)
    with old.engine.begin() as c:  # api_keys as an older release made it: no sample_rate
        c.execute(text("CREATE TABLE api_keys (id VARCHAR(40) PRIMARY KEY, name VARCHAR(200), "
                       "scope VARCHAR(16), key_hash VARCHAR(64) UNIQUE, prefix VARCHAR(16), "
                       "models JSON, rpm INTEGER, tpm INTEGER, created_at DATETIME, "
                       "revoked_at DATETIME)"))
    old.dispose()
    db = Database(database_url(tmp_path))
    secret, info = KeyStore(db).create(name="k", sample_rate=0.0)
    assert KeyStore(db).lookup(hash_key(secret)) == info and info.sample_rate == 0.0
    db.dispose()
