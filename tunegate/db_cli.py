"""`tunegate db`: the database schema's revision, upgrades and downgrades (Alembic underneath).

The database is the settings' (``TUNEGATE_DATABASE_URL``, else SQLite in ``TUNEGATE_DATA_DIR``)
unless ``--url`` names another. See docs/migrations.md for rolling a deployment.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec

import typer

if TYPE_CHECKING:
    from shared.db import Database

app = typer.Typer(
    help="Database schema: current revision, upgrade, downgrade, new revisions.",
    no_args_is_help=True,
)

P = ParamSpec("P")
URL_HELP = "Database URL; default: TUNEGATE_DATABASE_URL, else SQLite in TUNEGATE_DATA_DIR"


def _reporting(command: Callable[P, None]) -> Callable[P, None]:
    """A wrong revision id, URL or unreachable server, or data a revision cannot convert (a
    downgrade to a narrower column, say; PostgreSQL rolls the whole step back) ends the command
    with one line, exit 2."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        from alembic.util import CommandError
        from sqlalchemy.exc import ArgumentError, DBAPIError

        try:
            command(*args, **kwargs)
        except (CommandError, ArgumentError, DBAPIError) as exc:
            typer.echo(f"tunegate db: {str(exc).splitlines()[0]}", err=True)
            raise typer.Exit(2) from None

    return run


def _database(url: str | None) -> Database:
    from shared.db import Database
    from shared.settings import StorageSettings, database_url

    settings = StorageSettings()
    return Database(database_url(settings.data_dir, url) if url else settings.db_url, create=False)


@contextlib.contextmanager
def _url_or_scratch(url: str | None) -> Iterator[Database]:
    """The database at ``url``, else a scratch SQLite database at head; disposed afterwards."""
    from shared.db import Database

    with tempfile.TemporaryDirectory() as tmp:
        db = (
            _database(url)
            if url
            else Database(f"sqlite:///{Path(tmp) / 'scratch.db'}", auto_migrate=True)
        )
        try:
            yield db
        finally:
            db.dispose()


@app.command()
@_reporting
def current(url: str | None = typer.Option(None, help=URL_HELP)) -> None:
    """Print the database's revision and this code's head; exit 1 when the schema is behind."""
    from shared.migrate import status

    db = _database(url)
    try:
        st = status(db.engine)
    finally:
        db.dispose()
    typer.echo(f"database: {st.describe()}")
    typer.echo(f"head:     revision {st.head}")
    if st.at_head:
        typer.echo("up to date")
    elif not st.known:
        typer.echo("the database is at a revision this code does not ship (a newer release)")
    else:
        typer.echo("behind: run `tunegate db upgrade`")
        raise typer.Exit(1)


@app.command()
@_reporting
def upgrade(
    revision: str = typer.Argument("head", help="Target revision"),
    url: str | None = typer.Option(None, help=URL_HELP),
) -> None:
    """Upgrade the schema (adopting a database made before migrations). Safe to run twice."""
    from shared.migrate import status
    from shared.migrate import upgrade as do_upgrade

    db = _database(url)
    try:
        before = status(db.engine)
        added = do_upgrade(db.engine, revision)
        after = status(db.engine)
    finally:
        db.dispose()
    if before.unversioned:
        typer.echo(
            "adopted a database made before migrations; added: " + (", ".join(added) or "nothing")
        )
    typer.echo(f"{before.describe()} -> {after.describe()}")


@app.command()
@_reporting
def downgrade(
    revision: str = typer.Argument(..., help="Target revision (`base` drops every table)"),
    url: str | None = typer.Option(None, help=URL_HELP),
) -> None:
    """Downgrade the schema to REVISION. Stop every process first: they would upgrade it again."""
    from shared.migrate import downgrade as do_downgrade
    from shared.migrate import status

    db = _database(url)
    try:
        do_downgrade(db.engine, revision)
        typer.echo(f"now at {status(db.engine).describe()}")
    finally:
        db.dispose()


@app.command()
@_reporting
def revision(
    message: str = typer.Option(..., "-m", "--message", help="What the revision changes"),
    autogenerate: bool = typer.Option(False, help="Fill it in from the models' differences"),
    url: str | None = typer.Option(
        None, help="Compare against this database (at head); default: a scratch SQLite database"
    ),
) -> None:
    """(Development) Write a new revision file into shared/migrations/versions. Review it:
    autogenerate misses renames and data moves; keep it expand/contract (docs/migrations.md)."""
    from alembic import command

    from shared.migrate import alembic_config, target_metadata

    with _url_or_scratch(url) as db, db.engine.begin() as conn:
        script = command.revision(
            alembic_config(conn, target_metadata()),
            message=message,
            autogenerate=autogenerate,
        )
    scripts = script if isinstance(script, list) else [script]
    for s in scripts:
        if s is not None:
            typer.echo(f"wrote {s.path}")


@app.command()
@_reporting
def check(
    url: str | None = typer.Option(
        None, help="Compare this database; default: a scratch SQLite database at head"
    ),
) -> None:
    """Exit 1 when the models differ from the head revision (a model change without one)."""
    from shared.migrate import differences

    with _url_or_scratch(url) as db:
        diffs = differences(db.engine)
    for d in diffs:
        typer.echo(repr(d))
    if diffs:
        typer.echo(
            "the models differ from the revisions: run `tunegate db revision "
            "--autogenerate -m MESSAGE`"
        )
        raise typer.Exit(1)
    typer.echo("models and revisions agree")
