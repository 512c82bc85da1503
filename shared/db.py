"""Records in SQL: API keys, adapters, adapter versions, aliases and alias history.

SQLAlchemy 2 models plus one small :class:`Database` (engine + session factory). SQLite under the
data folder by default (``$TUNEGATE_DATA_DIR/tunegate.db``, WAL mode so several processes can read
while one writes); PostgreSQL (or any SQLAlchemy URL) through ``TUNEGATE_DATABASE_URL``.
The schema is made and changed by Alembic revisions (``shared/migrations``, see
``shared.migrate``): opening a :class:`Database` checks it, upgrading an embedded SQLite database
on the spot and refusing to run on a PostgreSQL database that is behind unless
``TUNEGATE_DATABASE_AUTO_MIGRATE`` allows it.

Other packages add their tables by subclassing :class:`Base`; every table change ships as a
revision (``tunegate db revision --autogenerate``), and a test fails when models and revisions
disagree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

# database_url and DB_FILE live with the storage settings; callers may import them from here.
from shared.settings import DB_FILE, StorageSettings, database_url  # noqa: F401


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


# Constraint and index names on every backend, so that revisions can drop and change them
# (SQLite names nothing by itself; PostgreSQL's own names differ).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class ApiKey(Base):
    """An API key. Only the sha256 of the secret is stored; ``prefix`` (first characters of the
    secret) is kept to let people tell keys apart in listings."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(
        "sample_rate IS NULL OR (sample_rate >= 0 AND sample_rate <= 1)", name="sample_rate"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))  # "user" | "admin" | "engine"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    prefix: Mapped[str] = mapped_column(String(16))
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: every model
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # requests per minute
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # tokens per minute
    # Share of this key's requests sampled (0..1); None: the gateway's default, 0: opted out.
    sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Whether this key's feedback labels become training data; None: only admin keys' do.
    may_label: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ConsoleSession(Base):
    """A console sign-in (``gateway.console_sessions``): only the token's sha256 is kept."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the token
    key_id: Mapped[str] = mapped_column(String(40))
    key_hash: Mapped[str] = mapped_column(String(64))  # the admin key's sha256 (re-checked)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Adapter(Base):
    """A named adapter: a line of immutable versions."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The last version number handed out (shared.registry allocates the next one by one atomic
    # UPDATE, so concurrent processes never get the same number; numbers are never reused).
    next_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AdapterVersion(Base):
    """One immutable version ``NAME@vN``; ``artifact`` is its folder relative to the store root."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        Index("ix_adapter_versions_hash", "name", "content_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("adapters.name"))
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 over (path, file sha256) pairs
    artifact: Mapped[str] = mapped_column(String(500))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Alias(Base):
    """Where an alias (``latest``, ``stable``, ``canary``) of a name points now."""

    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(ForeignKey("adapters.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AliasEvent(Base):
    """Every move of an alias, in order; rollback walks this history back."""

    __tablename__ = "alias_events"
    __table_args__ = (Index("ix_alias_events_name_alias", "name", "alias", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(32))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "set" | "rollback"
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Database:
    """An engine and a session factory for one URL. Cheap to make; make one per process."""

    def __init__(self, url: str, *, create: bool = True, auto_migrate: bool | None = None,
                 echo: bool = False) -> None:
        """``create``: bring the schema to the head revision (or refuse, see
        :func:`shared.migrate.ensure_schema`); ``auto_migrate`` None follows the setting."""
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self.ensure_schema(auto_migrate)

    @classmethod
    def from_settings(cls, settings: StorageSettings | None = None) -> Database:
        settings = settings or StorageSettings()
        return cls(settings.db_url, auto_migrate=settings.database_auto_migrate)

    def ensure_schema(self, auto_migrate: bool | None = None) -> None:
        from shared.migrate import ensure_schema

        ensure_schema(self.engine, auto_migrate)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (gateway processes) never block on the writer (CLI, trainer); busy_timeout in ms.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
