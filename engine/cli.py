"""`tunegate engine ...`: start an engine replica (embedded, or stock vLLM)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from engine.register import Registrar

app = typer.Typer(help="Engine replicas (vLLM's OpenAI protocol).", no_args_is_help=True)


class Kind(StrEnum):
    embedded = "embedded"
    vllm = "vllm"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    kind: Annotated[Kind | None, typer.Option(help="embedded (transformers+peft, CPU) or vllm "
                                              "(default: embedded)")] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder (default: SmolLM2)")] = None,
    host: Annotated[str | None, typer.Option(help="(default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="(default: 8001)")] = None,
    max_loras: Annotated[int | None, typer.Option(
        help="Resident LoRA adapters at most (default: 4)")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="(default: 16)")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        help="Sequences per batch at most (default: 16)")] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Context length, tokens (default: the model's)")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="(default: the model folder's name)")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="embedded: auto, float32 or bfloat16 (default: auto, bfloat16 where the CPU has "
             "it natively); vllm: passed on as --dtype "
             "(default: vLLM's, bfloat16 on CPU)")] = None,
    register: Annotated[str | None, typer.Option(
        metavar="GATEWAY_URL",
        help="Register with this gateway once up, deregister on exit")] = None,
    advertise_url: Annotated[str | None, typer.Option(
        help="The URL the gateway reaches this engine at (default: http://HOST:PORT; "
             "127.0.0.1 when HOST is 0.0.0.0 or ::)")] = None,
    admin_key: Annotated[str | None, typer.Option(
        help="Gateway key for --register: an engine-scope key is enough (`tunegate keys create "
             "--scope engine`; default: $TUNEGATE_ENGINE_REGISTER_KEY, else "
             "$TUNEGATE_DATA_DIR/local-admin.key; the variable keeps it out of `ps`)")] = None,
    log_level: str = "info",
) -> None:
    """Start a replica. Options left out come from TUNEGATE_ENGINE_* or the defaults; arguments
    after the options (vllm kind only) go to vLLM as they are."""
    from pydantic import ValidationError

    from engine.settings import EngineSettings

    given: dict[str, Any] = {
        "kind": kind.value if kind else None, "model": model, "host": host, "port": port,
        "max_loras": max_loras, "max_lora_rank": max_lora_rank, "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len, "served_model_name": served_model_name}
    if kind is not Kind.vllm:
        given["dtype"] = dtype
    try:
        settings = EngineSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    registrar = _registrar(register, advertise_url, admin_key, settings.kind, settings.host,
                           settings.port) if register else None
    if settings.kind == "vllm":
        from engine.vllm.launcher import serve_vllm

        # vLLM picks its own batch size (256 on GPU) unless one was asked for explicitly;
        # the embedded default of 16 suits 2 CPU cores, not a GPU.
        seqs = settings.max_num_seqs if "max_num_seqs" in settings.model_fields_set else None
        drain = None
        if registrar is not None:
            from engine.register import spawn
            from engine.vllm.launcher import DrainPlan

            drain = DrainPlan(base_url=registrar.health_url, registrar=spawn(registrar),
                              grace_s=settings.drain_grace_s, timeout_s=settings.drain_timeout_s)
        serve_vllm(api_key=settings.api_key.get_secret_value() if settings.api_key else None,
                   model=settings.model, host=settings.host, port=settings.port,
                   served_model_name=settings.model_name, max_loras=settings.max_loras,
                   max_lora_rank=settings.max_lora_rank, max_model_len=settings.max_model_len,
                   max_num_seqs=seqs,
                   extra_args=(["--dtype", dtype] if dtype else []) + list(ctx.args),
                   drain=drain)
        return
    if ctx.args:
        raise typer.BadParameter(f"unexpected arguments for the embedded kind: {ctx.args}")
    if not (settings.model / "config.json").is_file():
        typer.secho(f"error: no model at {settings.model} (run `tunegate models pull`)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)

    import uvicorn

    from engine.drain import DrainingServer
    from engine.embedded.server import create_app

    app = create_app(settings)
    deregister = None
    if registrar is not None:
        from engine.register import attach

        deregister = attach(app, registrar)
    # On SIGTERM: deregister, keep serving drain_grace_s, then requests in flight get up to
    # drain_timeout_s (engine.drain).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    DrainingServer(config, deregister=deregister,
                   grace_s=settings.drain_grace_s if registrar is not None else 0.0).run()


def _registrar(gateway: str, advertise: str | None, key: str | None, kind: str, host: str,
               port: int) -> Registrar:
    """The registrar for ``--register``; bad URLs and a missing key are refused before the
    engine starts (unreachable gateways later are only logged)."""
    from engine.register import RegisterSettings, Registrar, admin_key, advertise_url
    from shared.errors import InvalidRequest
    from shared.replicas import replica_url

    settings = RegisterSettings()
    key = admin_key(key, settings)
    if key is None:
        raise typer.BadParameter("no admin key: pass --admin-key, set "
                                 "TUNEGATE_ENGINE_REGISTER_KEY or run `tunegate up` once "
                                 "(it writes $TUNEGATE_DATA_DIR/local-admin.key)")
    try:
        replica_url(gateway)
        return Registrar(gateway, advertise or advertise_url(host, port), key, kind=kind,
                         health_url=advertise_url(host, port), interval_s=settings.interval_s,
                         timeout_s=settings.timeout_s)
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.message) from exc


@app.command("tune-lora")
def tune_lora(
    out: Annotated[Path, typer.Option(help="Folder for vLLM's kernel config files "
                                      "(then TUNEGATE_VLLM_LORA_KERNEL_CONFIGS=OUT)")],
    model: Annotated[Path | None, typer.Option(help="Model folder whose shape to tune for")] = None,
    shape: Annotated[str | None, typer.Option(
        help="Or a known shape instead of a model folder (llama-3.1-8b)")] = None,
    rank: int = 16,
    max_loras: int = 4,
    budget_s: Annotated[float, typer.Option(help="Search time, seconds")] = 300.0,
) -> None:
    """Tune vLLM's LoRA Triton kernels for this GPU (runs under vLLM's python; see
    engine/vllm/tune_lora.py). tunegate ships configs for the H200 only."""
    import json
    import subprocess
    import tempfile

    from engine.models import SHAPES
    from engine.vllm.launcher import VllmNotFound, VllmSettings, check_vllm_python
    from engine.vllm.tune_lora import tune_command

    if (model is None) == (shape is None):
        raise typer.BadParameter("give one of --model and --shape")
    if shape is not None and shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape `{shape}`; known: {', '.join(sorted(SHAPES))}")
    if model is not None and not (model / "config.json").is_file():
        raise typer.BadParameter(f"no config.json in {model}")
    python = VllmSettings().resolve_python()
    try:
        check_vllm_python(python)
    except VllmNotFound as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    with tempfile.TemporaryDirectory() as tmp:
        if shape is not None:  # the tuner reads only config.json
            model = Path(tmp)
            (model / "config.json").write_text(json.dumps(SHAPES[shape]))
        assert model is not None
        raise typer.Exit(subprocess.call(tune_command(
            python, model=model, out=out, rank=rank, max_loras=max_loras, budget_s=budget_s)))
