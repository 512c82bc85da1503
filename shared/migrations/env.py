"""Alembic's environment for tunegate's schema (loaded by path, not imported as a module).

tunegate's own code (``shared.migrate``) hands in an open connection through
``config.attributes["connection"]``; the ``alembic`` command line run from the repository
(``[tool.alembic]`` in pyproject.toml) connects to the settings' URL
(``TUNEGATE_DATABASE_URL``, else SQLite in ``TUNEGATE_DATA_DIR``) and compares against the
models' metadata for ``--autogenerate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from shared import migrate
from shared.db import UTCDateTime, database_url

config = context.config
# The models' metadata, for autogenerate and comparison only: upgrades run the revisions alone.
target_metadata = config.attributes.get("target_metadata")
if target_metadata is None and config.cmd_opts is not None:
    target_metadata = migrate.target_metadata()


def _render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Revisions never import the models: UTCDateTime is stored as a timezone-aware DateTime.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_item=_render_item,
        # SQLite alters tables by copying them ("batch mode"); a no-op on PostgreSQL.
        render_as_batch=True,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    # `alembic -x url=... upgrade head` names another database.
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    url = database_url(Path("."), x_url) if x_url else migrate.settings_url()
    if context.is_offline_mode():  # `alembic upgrade --sql`: print the DDL for a DBA
        _configure(url=url, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


run()
