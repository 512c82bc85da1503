"""`tunegate trainer ...`: the worker, the demo data, and following a job's progress."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The training worker and its tools.", no_args_is_help=True)


class Role(StrEnum):
    all = "all"
    train = "train"
    monitor = "monitor"


@app.command()
def worker(
    burst: bool = typer.Option(False, help="Exit when the queue is empty."),
    role: Annotated[Role, typer.Option(
        help="all: training jobs and the monitor in one process; train: training jobs only "
             "(GPU nodes, scaled on the queue); monitor: the monitor's cron jobs and the "
             "ingestion of sampled traffic")] = Role.all,
) -> None:
    """Run a training worker on REDIS_URL (one job at a time), with the evaluation jobs' worker
    (quality monitor, shadow evaluation, promotion tick; see trainer.schedule) beside it."""
    import logging

    from shared.db import Database
    from trainer.schedule import (
        MonitorSettings,
        create_monitor_worker,
        monitor_worker_settings,
        run_with_monitor,
    )
    from trainer.settings import TrainerSettings
    from trainer.worker import create_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = TrainerSettings()
    # The schema before the workers start: SQLite is upgraded; a PostgreSQL schema behind ends
    # the command with what to run (tunegate.cli.main prints it).
    Database.from_settings(settings).dispose()
    monitor = MonitorSettings()
    if role is Role.monitor:
        from arq import Worker

        Worker(**monitor_worker_settings(settings, monitor,
                                         ingest_traffic=settings.ingest_traffic),
               burst=burst).run()
        return
    main = create_worker(settings, burst=burst)
    with_monitor = role is Role.all and monitor.enabled and not burst
    run_with_monitor(main, create_monitor_worker(settings, monitor) if with_monitor else None)


@app.command("rotten-tomatoes")
def rotten_tomatoes(
    out_dir: Annotated[Path, typer.Argument(help="Folder for train.jsonl and golden.jsonl")],
    n_train: int = 1160,
    n_golden: int = 200,
    seed: int = 0,
) -> None:
    """Write the Rotten Tomatoes train and golden splits (deterministic by seed)."""
    from trainer.data_sources import write_splits

    train, golden = write_splits(out_dir, n_train=n_train, n_golden=n_golden, seed=seed)
    typer.echo(f"{train}\n{golden}")


@app.command()
def validate(
    path: Path,
    max_output_chars: int = 512,
    max_invalid_fraction: float = 0.02,
) -> None:
    """Validate a JSONL training file and print the line-level report."""
    from shared.data import validate_file

    report = validate_file(path, max_output_chars=max_output_chars,
                           max_invalid_fraction=max_invalid_fraction)
    typer.echo(report.summary(limit=100))
    raise typer.Exit(0 if report.accepted else 1)


@app.command()
def follow(job_id: str, poll_s: float = 1.0) -> None:
    """Follow a job's progress from the records database, with a progress bar."""
    from shared.db import Database
    from shared.job_records import TERMINAL, JobStore
    from shared.settings import StorageSettings

    store = JobStore(Database.from_settings(StorageSettings()))
    last_id: int | None = None
    bar = None
    done = 0
    while True:
        job = store.get(job_id)
        if job is None:
            typer.echo(f"no job {job_id}", err=True)
            raise typer.Exit(2)
        for ev in store.events(job_id, after=last_id, limit=1000):
            last_id = ev["id"]
            data = ev["data"] or {}
            if ev["type"] == "metrics" and "total_steps" in data:
                if bar is None:
                    bar = typer.progressbar(length=data["total_steps"], label="training")
                    bar.__enter__()
                bar.update(data["step"] - done)
                done = data["step"]
            else:
                typer.echo(f"\n{ev['message']}" if bar else ev["message"])
        if job["status"] in TERMINAL:
            if bar is not None:
                bar.__exit__(None, None, None)
            typer.echo(f"{job['status']}: {job['fine_tuned_model'] or job['error'] or ''}")
            raise typer.Exit(0 if job["status"] == "succeeded" else 1)
        time.sleep(poll_s)
