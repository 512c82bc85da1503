"""``tunegate adapters list | show | rollback | promote | promotion ...``: the adapter registry
and promotions (``shared.promotion``), straight in the database and the artifact store
(``TUNEGATE_DATABASE_URL``, ``TUNEGATE_ARTIFACT_STORE``; defaults under ``TUNEGATE_DATA_DIR``),
like ``tunegate keys``. Running gateways see a moved alias within twice their cache TTL
(``TUNEGATE_GATEWAY_CACHE_TTL_S``, 2 s by default)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import typer

app = typer.Typer(help="Adapter versions and aliases (the registry).", no_args_is_help=True)


def _registry() -> Any:
    from shared.db import Database
    from shared.registry import Registry
    from shared.settings import StorageSettings

    settings = StorageSettings()
    return Registry.from_settings(Database(settings.db_url), settings)


@contextlib.contextmanager
def _failing() -> Iterator[None]:
    """A registry or promotion error becomes a message on stderr and exit code 2."""
    from shared.errors import TunegateError

    try:
        yield
    except TunegateError as exc:
        raise _fail(exc) from None


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {getattr(exc, 'message', str(exc))}", err=True)
    return typer.Exit(2)


def _aliases(aliases: dict[str, int]) -> str:
    return " ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "-"


@app.command("list")
def list_adapters(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every adapter name with its number of versions and where its aliases point."""
    rows = _registry().list_adapters()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no adapters registered")
    for r in rows:
        typer.echo(f"{r['name']}  versions={r['versions']}  {_aliases(r['aliases'])}")


@app.command()
def show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """An adapter's versions (hash, golden score, job) and its alias history."""
    reg = _registry()
    with _failing():
        info = reg.get_adapter(name)
    history = reg.alias_history(name)
    if as_json:
        typer.echo(json.dumps({**info, "history": history}))
        return
    typer.echo(f"{name}  {_aliases(info['aliases'])}")
    for v in info["versions"]:
        m = v["manifest"]
        score = m.get("metrics", {}).get("golden_score")
        typer.echo(f"  {v['id']}  sha256={v['content_hash'][:12]}  {v['created_at']}  "
                   f"golden={'-' if score is None else f'{score:.3f}'}  "
                   f"job={m.get('job_id', '-')}  base={m.get('base_model', '-')}")
    typer.echo("history:")
    for h in history:
        before = "-" if h["from_version"] is None else f"v{h['from_version']}"
        typer.echo(f"  {h['at']}  {h['alias']}: {before} -> v{h['to_version']}  {h['kind']}"
                   + (f"  ({h['reason']})" if h["reason"] else ""))


@app.command()
def rollback(
    name: str,
    alias: str = typer.Option("stable", help="latest | stable | canary"),
    reason: str = typer.Option("operator rollback", help="Recorded in the alias history"),
) -> None:
    """Move ALIAS back to the version it held before its last move (repeat to go further)."""
    with _failing():
        version = _registry().rollback(name, alias, reason=reason)
    typer.echo(f"{name}:{alias} -> {name}@v{version}")


@app.command()
def promote(
    ref: str = typer.Argument(..., help="NAME@vN"),
    alias: str = typer.Option("stable", help="latest | stable | canary"),
    reason: str = typer.Option("operator promotion", help="Recorded in the alias history"),
) -> None:
    """Point ALIAS at the version NAME@vN."""
    from shared.registry import parse_model_name

    with _failing():
        name, _, version = parse_model_name(ref)
        if version is None:
            typer.echo(f"error: {ref!r} is not NAME@vN", err=True)
            raise typer.Exit(2)
        _registry().set_alias(name, alias, version, reason=reason)
    typer.echo(f"{name}:{alias} -> {name}@v{version}")


promotion_app = typer.Typer(
    help="Promotions (candidate -> shadow -> canary -> stable; see shared.promotion).",
    no_args_is_help=True)
app.add_typer(promotion_app, name="promotion")


def _promotions() -> Any:
    from shared.promotion import Promotions

    reg = _registry()
    return Promotions(reg.db, reg)


def _print_promotion(p: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(p))
        return
    typer.echo(f"{p['ref']}  {p['state']}  since {p['state_since']}  baseline="
               f"{'-' if p['baseline'] is None else 'v' + str(p['baseline'])}  "
               f"shadow={p['shadow_fraction']}  canary={p['canary_weight']}")
    for e in p.get("events", []):
        typer.echo(f"  {e['at']}  {e['from_state'] or '-'} -> {e['to_state']}  by {e['actor']}: "
                   f"{e['reason']}")


@promotion_app.command("start")
def promotion_start(
    ref: str = typer.Argument(..., help="NAME@vN"),
    shadow_fraction: float | None = typer.Option(None, help="Share of NAME requests mirrored"),
    canary_weight: float | None = typer.Option(None, help="Share of NAME requests answered"),
    reason: str = typer.Option("started by an operator"),
) -> None:
    """Start promoting NAME@vN (state candidate; the monitor's gates move it on)."""
    from shared.promotion import parse_ref

    with _failing():
        name, version = parse_ref(ref)
        p = _promotions().start(name, version, actor="cli", reason=reason,
                                shadow_fraction=shadow_fraction, canary_weight=canary_weight)
    _print_promotion(p, False)


@promotion_app.command("show")
def promotion_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """NAME's current (or last) promotion and every promotion event of NAME."""
    with _failing():
        p = _promotions().get(name)
    _print_promotion(p, as_json)


@promotion_app.command("promote")
def promotion_promote(name: str, reason: str = typer.Option("by an operator")) -> None:
    """Move NAME's promotion one step forward by hand (the gates are skipped)."""
    with _failing():
        p = _promotions().advance(name, actor="cli", reason=reason)
    typer.echo(f"{p['ref']}: {p['from_state']} -> {p['state']}")


@promotion_app.command("rollback")
def promotion_rollback(name: str, reason: str = typer.Option("by an operator")) -> None:
    """Stop NAME's promotion: reject the candidate, roll back its canary, or move stable back."""
    with _failing():
        p = _promotions().stop(name, actor="cli", reason=reason)
    typer.echo(f"{p['ref']}: {p['from_state']} -> {p['state']}")
