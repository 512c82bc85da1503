"""The `tunegate` command. Each package contributes a typer sub-app; heavy imports (torch,
transformers) happen inside the commands, so `tunegate --help` stays fast."""

from __future__ import annotations

import typer

from tunegate import models_cli

app = typer.Typer(help="tunegate: serve and improve fine-tuned LLMs.", no_args_is_help=True)
app.add_typer(models_cli.app, name="models")


def _mount() -> None:
    # Sub-apps of the other packages, mounted when they exist in this tree.
    import importlib

    for name, module in (
        ("engine", "engine.cli"),
        ("gateway", "gateway.cli"),
        ("keys", "gateway.keys_cli"),
        ("trainer", "trainer.cli"),
    ):
        try:
            sub = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.add_typer(sub.app, name=name)


_mount()


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    engine_port: int = 8001,
    worker: bool = True,
) -> None:
    """Start the embedded system: Redis, an engine replica, the gateway and a trainer worker."""
    from tunegate.up import run

    raise typer.Exit(run(host=host, port=port, engine_port=engine_port, with_worker=worker))
