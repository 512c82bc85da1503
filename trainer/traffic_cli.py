"""``tunegate traffic export | ingest``: sampled traffic as files, straight from the database.

``tunegate traffic export --model M --since T [--until T] [--labelled] OUT.jsonl`` writes samples
of ``M`` (``NAME``, ``NAME@vN`` or ``base``) as JSONL records in the training/golden shapes
(``shared.traffic_datasets``): with ``--labelled``, only samples with feedback, the
``corrected_output`` or ``label`` as the answer (a golden file for evaluation); without it, every
sample, unlabelled ones with the answer that was served. ``T`` is an ISO 8601 date or time (UTC
when it has no zone) or a span back from now: ``30m``, ``24h``, ``7d``.

``tunegate traffic ingest`` moves what waits on the Redis stream into SQL once (what the worker
does every second), for operators and scripts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import typer

app = typer.Typer(help="Sampled traffic: export as data, ingest by hand.", no_args_is_help=True)

_SPAN = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_time(value: str) -> dt.datetime:
    """ISO 8601 (UTC when naive) or ``<N>m|h|d`` before now."""
    m = _SPAN.match(value.strip())
    if m:
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use ISO 8601 (2026-01-31T12:00) or 30m/24h/7d"
                                 ) from None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t


@app.command()
def export(
    out: Path = typer.Argument(..., help="The JSONL file to write"),  # noqa: B008
    model: str = typer.Option(..., help="NAME (every version), NAME@vN or base"),
    since: str = typer.Option(..., help="ISO 8601 time, or 30m / 24h / 7d before now"),
    until: str | None = typer.Option(None, help="End (exclusive); default: now"),
    labelled: bool = typer.Option(False, "--labelled", help="Only samples with feedback; the "
                                  "corrected output or label is the answer"),
) -> None:
    """Write sampled traffic as training/golden JSONL records."""
    from shared.data import write_jsonl
    from shared.db import Database
    from shared.errors import TunegateError
    from shared.settings import StorageSettings
    from shared.traffic_datasets import traffic_data

    db = Database(StorageSettings().db_url)
    try:
        data = traffic_data(db, model, parse_time(since),
                            parse_time(until) if until else None, labelled=labelled)
    except TunegateError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    finally:
        db.dispose()
    write_jsonl(out, data.records)
    typer.echo(json.dumps({"out": str(out), **data.summary()}))


@app.command()
def ingest() -> None:
    """Move the samples waiting on the Redis stream into SQL, once."""
    import asyncio

    from shared.db import Database
    from shared.settings import StorageSettings
    from trainer.settings import TrainerSettings
    from trainer.traffic_ingest import Ingester

    settings = TrainerSettings()

    async def run() -> dict[str, int]:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(settings.redis_url)
        db = Database(StorageSettings(data_dir=settings.data_dir).db_url)
        total: dict[str, int] = {}
        try:
            ingester = Ingester(redis, db, stream=settings.traffic_stream)
            while True:
                result = await ingester.run_once()
                for k, v in vars(result).items():
                    total[k] = total.get(k, 0) + v
                if result.read < ingester.batch:
                    return total
        finally:
            await redis.aclose()
            db.dispose()

    typer.echo(json.dumps(asyncio.run(run())))
