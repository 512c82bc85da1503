"""``tunegate keys create | list | sample-rate | revoke``: manage API keys straight in the database.

This is how the first admin key is made (bootstrapping): ``tunegate keys create --scope admin
--name ops`` prints the key once; the database (``TUNEGATE_DATABASE_URL``, default SQLite in
``TUNEGATE_DATA_DIR``) keeps only its sha256. Later keys can also be made through
``POST /admin/keys`` with an admin key.
"""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="API keys (written straight to the database).", no_args_is_help=True)


def _store():  # type: ignore[no-untyped-def]
    from gateway.auth import KeyStore
    from shared.db import Database
    from shared.settings import StorageSettings

    return KeyStore(Database(StorageSettings().db_url))


@app.command()
def create(
    name: str = typer.Option(..., help="Who or what the key is for"),
    scope: str = typer.Option("user", help="user | admin | engine (only registers replicas)"),
    models: str | None = typer.Option(None, help="Comma-separated names allowed "
                                      "(base, adapter names); default: every model"),
    rpm: int | None = typer.Option(None, help="Requests per minute; default: no limit"),
    tpm: int | None = typer.Option(None, help="Tokens per minute; default: no limit"),
    key: str | None = typer.Option(None, help="Use this secret instead of a random one"),
    sample_rate: float | None = typer.Option(
        None, help="Share of this key's requests sampled, 0..1 (0 opts out); default: the "
        "gateway's rate"),
    may_label: bool | None = typer.Option(
        None, "--may-label/--no-label", help="Whether its feedback becomes training data; "
        "default: admin keys only"),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON"),
) -> None:
    """Create a key and print it (once: it cannot be shown again)."""
    from shared.errors import TunegateError

    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        secret, info = _store().create(name=name, scope=scope, models=allowed, rpm=rpm,
                                       tpm=tpm, secret=key, sample_rate=sample_rate,
                                       may_label=may_label)
    except TunegateError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({**info.public(), "key": secret}))
    else:
        typer.echo(secret)
        typer.echo(f"id {info.id}  scope {info.scope}  (the key is shown only this once)",
                   err=True)


@app.command("list")
def list_keys(as_json: bool = typer.Option(False, "--json")) -> None:
    """List keys (never their secrets)."""
    infos = _store().list()
    if as_json:
        typer.echo(json.dumps([k.public() for k in infos]))
        return
    for k in infos:
        state = "revoked" if k.revoked_at else "active"
        models = ",".join(k.models) if k.models is not None else "*"
        typer.echo(f"{k.id}  {k.prefix}...  {k.scope:5}  {state:7}  rpm={k.rpm}  tpm={k.tpm}  "
                   f"models={models}  sample_rate={k.sample_rate}  may_label={k.can_label}  "
                   f"{k.name}")


@app.command("sample-rate")
def sample_rate(
    key_id: str,
    rate: str = typer.Argument(..., help="0..1 (0 opts the key out of sampling), or `default`"),
) -> None:
    """Set a key's traffic sampling override (running gateways see it within 4 s)."""
    from shared.errors import TunegateError

    try:
        value = None if rate == "default" else float(rate)
        info = _store().set_sample_rate(key_id, value)
    except ValueError:
        typer.echo(f"error: {rate!r} is neither a number nor `default`", err=True)
        raise typer.Exit(2) from None
    except TunegateError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    shown = "the gateway's default" if info.sample_rate is None else info.sample_rate
    typer.echo(f"{info.id} sample_rate: {shown}")


@app.command()
def revoke(key_id: str) -> None:
    """Revoke a key by id (takes effect in running gateways within twice their cache TTL: 4 s)."""
    from shared.errors import TunegateError

    try:
        info = _store().revoke(key_id)
    except TunegateError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"revoked {info.id} ({info.name})")
