"""Schema migrations: Alembic revisions shipped in ``shared/migrations``, applied under a lock.

Every process checks the schema when it opens the database (:func:`ensure_schema`):

- at the head revision (the usual case) nothing happens;
- behind, an embedded SQLite database is upgraded on the spot; any other backend (PostgreSQL) is
  upgraded only when the operator allows it (``TUNEGATE_DATABASE_AUTO_MIGRATE=true``), otherwise
  the process refuses to start with :class:`SchemaOutOfDate`, which says what to run;
- at a revision this code does not know (a newer release migrated it), the process runs on it:
  revisions are written expand/contract, so older code keeps working on a newer schema.

Migrations take a lock first (a file lock beside a SQLite database, a transaction-scoped advisory
lock on PostgreSQL) and look again once they hold it, so two processes never run one migration
twice: one migrates, the other waits and finds the work done.

A database made before migrations existed (``create_all`` plus added nullable columns) is
*adopted*: the tables, columns and indexes of the first revision that it lacks are added, it is
stamped at that revision, and the later revisions run as usual.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from shared.errors import TunegateError

log = logging.getLogger("tunegate.migrate")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
FIRST_REVISION = "0001"  # the schema as create_all made it before migrations existed
# Modules whose tables subclass shared.db.Base: imported for autogenerate and the model check
# only (an upgrade runs the revisions alone). By name, since shared imports no process package;
# a module that adds tables is added here.
MODEL_MODULES = (
    "shared.db",
    "shared.promotion",
    "shared.replicas",
    "shared.traffic_records",
    "shared.job_records",
)
# Any number; PostgreSQL advisory locks are keyed by a 64-bit integer per database.
_PG_LOCK_KEY = 0x74756E6567617465  # "tunegate"
_AUTO_MIGRATE_HINT = "TUNEGATE_DATABASE_AUTO_MIGRATE=true"


class SchemaOutOfDate(TunegateError):
    """The database is behind this code and this process may not migrate it."""

    status = 503
    type = "server_error"


class SchemaAdoptionError(TunegateError):
    """A database made before migrations lacks something adoption cannot add."""


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None  # the stamped revision; None for an empty or unversioned database
    head: str  # the newest revision this code ships
    unversioned: bool  # has tunegate tables but no revision: made before migrations existed
    known: bool  # current is one of this code's revisions (or None)

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def behind(self) -> bool:
        return not self.at_head and self.known

    def describe(self) -> str:
        if self.unversioned:
            return "tables made before schema migrations (no revision stamped)"
        return f"revision {self.current}" if self.current else "no tables yet"


def settings_url() -> str:
    """The database URL of the settings (``TUNEGATE_DATABASE_URL`` or SQLite in the data dir)."""
    from shared.settings import StorageSettings

    return StorageSettings().db_url


def auto_migrate_setting() -> bool | None:
    from shared.settings import StorageSettings

    return StorageSettings().database_auto_migrate


def alembic_config(
    connection: Connection | None = None, metadata: sa.MetaData | None = None
) -> Config:
    """An Alembic config for the shipped revisions; ``connection`` is the one they run on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    if metadata is not None:
        cfg.attributes["target_metadata"] = metadata
    return cfg


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script().get_current_head()
    assert head is not None, "no revisions shipped"
    return head


def target_metadata() -> sa.MetaData:
    """The models' metadata, every table module imported."""
    db, *_ = (importlib.import_module(name) for name in MODEL_MODULES)
    # shared.db (first) opens databases through this module, so it is named, not imported here.
    return db.Base.metadata  # type: ignore[no-any-return]


def first_schema() -> sa.MetaData:
    """The first revision's tables, frozen (adoption compares old databases against them)."""
    module: Any = script().get_revision(FIRST_REVISION).module
    meta: sa.MetaData = module.schema()
    return meta


def status_of(conn: Connection) -> SchemaStatus:
    current = MigrationContext.configure(conn).get_current_revision()
    scripts = script()
    unversioned = current is None and any(
        sa.inspect(conn).has_table(t) for t in first_schema().tables
    )
    known = current is None or _has_revision(scripts, current)
    return SchemaStatus(current, head_revision(), unversioned, known)


def status(engine: Engine) -> SchemaStatus:
    with engine.connect() as conn:
        return status_of(conn)


def ensure_schema(engine: Engine, auto_migrate: bool | None = None) -> SchemaStatus:
    """Bring the schema to head when allowed (see the module docstring); returns the status
    found before. ``auto_migrate`` None: the setting, whose default migrates SQLite only."""
    found = status(engine)
    if found.at_head:
        return found
    if not found.known:
        log.warning(
            "database schema at revision %s, which this code does not ship (its head is "
            "%s): a newer release migrated it; running on it",
            found.current,
            found.head,
        )
        return found
    if auto_migrate is None:
        auto_migrate = auto_migrate_setting()
    if auto_migrate is None:
        auto_migrate = engine.dialect.name == "sqlite"
    if not auto_migrate:
        raise SchemaOutOfDate(
            f"The database schema is behind this tunegate: it has {found.describe()}, this code "
            f"needs revision {found.head}. Run `tunegate db upgrade` once (same "
            f"TUNEGATE_DATABASE_URL), then start the processes; or set {_AUTO_MIGRATE_HINT} to let "
            "a starting process migrate it (see docs/migrations.md).",
            code="schema_out_of_date",
        )
    upgrade(engine)
    return found


def upgrade(engine: Engine, revision: str = "head") -> list[str]:
    """Upgrade to ``revision`` under the lock, adopting an unversioned database first. Returns
    what adoption added (empty when there was nothing to adopt)."""
    with _locked(engine) as conn:
        found = status_of(conn)
        if found.at_head and revision == "head":
            return []  # another process did it while this one waited for the lock
        added: list[str] = []
        if found.unversioned:
            added = _adopt(conn)
            log.warning(
                "adopted a database made before migrations at revision %s (added: %s)",
                FIRST_REVISION,
                ", ".join(added) or "nothing",
            )
        command.upgrade(alembic_config(conn), revision)
        return added


def downgrade(engine: Engine, revision: str) -> None:
    with _locked(engine) as conn:
        command.downgrade(alembic_config(conn), revision)


def stamp(engine: Engine, revision: str) -> None:
    with _locked(engine) as conn:
        command.stamp(alembic_config(conn), revision)


def differences(engine: Engine) -> list[Any]:
    """What autogenerate finds between the database and the models (empty: they agree)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, target_metadata()))


def _has_revision(scripts: ScriptDirectory, rev: str) -> bool:
    try:
        return scripts.get_revision(rev) is not None
    except (CommandError, RevisionError):  # an id no revision of this code has
        return False


def _adopt(conn: Connection) -> list[str]:
    """Add what the first revision has and this unversioned database lacks, then stamp it."""
    frozen = first_schema()
    insp = sa.inspect(conn)
    tables = set(insp.get_table_names())
    ops = Operations(MigrationContext.configure(conn))
    added = []
    for table in frozen.sorted_tables:
        if table.name not in tables:
            table.create(conn)
            added.append(table.name)
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable or col.primary_key:
                raise SchemaAdoptionError(
                    f"cannot adopt this database: table {table.name} lacks the required column "
                    f"{col.name}; it was not made by a tunegate release"
                )
            ops.add_column(table.name, sa.Column(col.name, col.type, nullable=True))
            added.append(f"{table.name}.{col.name}")
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
                added.append(str(index.name))
    command.stamp(alembic_config(conn), FIRST_REVISION)
    return added


@contextlib.contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction, held by this process alone among migrating processes."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    with contextlib.ExitStack() as stack:
        if path and path != ":memory:":
            lock = stack.enter_context(Path(path + ".migrate-lock").open("a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process migrates
        conn = stack.enter_context(engine.begin())
        if engine.dialect.name == "postgresql":
            # Released when this transaction ends; PostgreSQL runs DDL inside transactions.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        yield conn
