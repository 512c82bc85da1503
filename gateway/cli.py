"""``tunegate gateway serve``."""

from __future__ import annotations

import os
from typing import Any

import typer

app = typer.Typer(help="The gateway: keys, quotas, routing, the OpenAI API.", no_args_is_help=True)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Default: TUNEGATE_GATEWAY_HOST or 127.0.0.1"),
    port: int | None = typer.Option(None, help="Default: TUNEGATE_GATEWAY_PORT or 8000"),
    engine: list[str] | None = typer.Option(  # noqa: B008
        None, "--engine", help="Engine replica base URL (repeat for several); "
        "default: TUNEGATE_GATEWAY_ENGINES"),
    workers: int = typer.Option(1, help="Gateway processes sharing the port"),
) -> None:
    """Serve the gateway with uvicorn (uvloop + httptools)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from shared.db import Database

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if engine:
        overrides["engines"] = engine
    settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
    # The schema before uvicorn starts (once, not per worker): SQLite is upgraded; a PostgreSQL
    # schema behind ends the command with what to run (tunegate.cli.main prints it).
    Database(settings.db_url).dispose()
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "loop": "uvloop",
              "http": "httptools", "access_log": False, "log_level": settings.log_level,
              "timeout_graceful_shutdown": 10}
    if workers > 1:
        # Workers build the app from the environment: pass the CLI's choices through it.
        os.environ["TUNEGATE_GATEWAY_ENGINES"] = ",".join(settings.engines)
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
