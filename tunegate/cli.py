"""The `tunegate` command. Each package contributes a typer sub-app; heavy imports (torch,
transformers) happen inside the commands, so `tunegate --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tunegate import db_cli, jobs_cli, models_cli

app = typer.Typer(help="tunegate: serve and improve fine-tuned LLMs.", no_args_is_help=True)
app.add_typer(models_cli.app, name="models")
app.add_typer(db_cli.app, name="db")
app.add_typer(jobs_cli.app, name="jobs")


def _mount() -> None:
    # Sub-apps of the other packages, mounted when they exist in this tree.
    import importlib

    for name, module in (
        ("engine", "engine.cli"),
        ("gateway", "gateway.cli"),
        ("keys", "gateway.keys_cli"),
        ("adapters", "gateway.adapters_cli"),
        ("trainer", "trainer.cli"),
        ("traffic", "trainer.traffic_cli"),
        ("parity", "engine.parity_cli"),
    ):
        try:
            sub = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.add_typer(sub.app, name=name)


_mount()


def main() -> None:
    """The console script: `app`, with a schema that is behind reported in one line."""
    try:
        app()
    except Exception as exc:
        from shared.migrate import SchemaAdoptionError, SchemaOutOfDate

        if isinstance(exc, SchemaOutOfDate | SchemaAdoptionError):
            print(f"tunegate: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    engine_port: int = 8001,
    worker: bool = True,
    distributed: bool = typer.Option(
        False, help="The multi-process shape instead: --gateways gateway processes (ports PORT, "
                    "PORT+1, ...), --engines self-registering engine replicas (ports "
                    "ENGINE_PORT, ...), a training and a monitor worker; needs "
                    "TUNEGATE_DATABASE_URL=postgresql://..."),
    gateways: int = typer.Option(2, min=1, max=16),
    engines: int = typer.Option(2, min=1, max=16),
) -> None:
    """Start the embedded system: Redis, an engine replica, the gateway and a trainer worker."""
    if distributed:
        from tunegate.topology import TopologyConfig, run_distributed

        raise typer.Exit(run_distributed(TopologyConfig(
            gateways=gateways, engines=engines, host=host, gateway_port=port,
            engine_port=engine_port)))
    from tunegate.up import run

    raise typer.Exit(run(host=host, port=port, engine_port=engine_port, with_worker=worker))


@app.command()
def demo(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="The gateway of `tunegate up`"),
    api_key: str | None = typer.Option(None, help="Default: $TUNEGATE_DATA_DIR/local-admin.key"),
    model: str = "SmolLM2-135M-Instruct",
    name: str = typer.Option("rt-demo", help="The adapter's name"),
    n_train: int = typer.Option(1160, "--train", help="Training reviews"),
    n_golden: int = typer.Option(200, "--golden", help="Golden reviews"),
    epochs: int = 2,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    max_steps: int | None = typer.Option(None, help="Stop training early (smoke runs)"),
    threshold: float = typer.Option(0.85, help="Evaluation gate: golden accuracy to register"),
    seed: int = 0,
    timeout_s: float = 3600.0,
    out: Path = Path("bench/results/demo_cpu.json"),
) -> None:
    """Fine-tune a sentiment adapter on Rotten Tomatoes reviews through the running gateway
    (files, fine-tuning job, events), then print golden accuracy before/after and an answer."""
    from trainer.demo import DemoOptions, run

    report = run(DemoOptions(
        base_url=base_url, api_key=api_key, model=model, name=name, n_train=n_train,
        n_golden=n_golden, n_epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        max_steps=max_steps, threshold=threshold, seed=seed, timeout_s=timeout_s, out=out))
    raise typer.Exit(0 if report["status"] == "succeeded" else 1)
