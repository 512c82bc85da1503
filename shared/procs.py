"""Child servers on 127.0.0.1: free ports, waiting for ``/health``, stopping process groups.

Used by the tools that start engines themselves (``tunegate parity``), by the benchmarks and by
the tests, so a server is started and stopped the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float,
                 log: Path | None = None) -> float:
    """Poll ``url`` (a full URL such as ``http://127.0.0.1:8001/health``) until it answers 200;
    returns the seconds it took. Raises when ``proc`` exits first or the time runs out."""
    start = time.monotonic()
    see = f"; see {log}" if log else ""
    last: Exception | None = None
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} "
                               f"answered{see}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s ({last}){see}")


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), then
    SIGKILL after ``grace_s`` seconds."""
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
def server(cmd: Sequence[str], *, port: int, env: dict[str, str] | None = None,
           log: Path | None = None, health_path: str = "/health", timeout_s: float = 300.0,
           grace_s: float = 15.0) -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    """Start ``cmd`` in its own process group (``env`` replaces the environment when given),
    wait for ``health_path``, yield ``(base_url, process, seconds to healthy)``, then stop the
    whole group."""
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = wait_healthy(base + health_path, proc, timeout_s, log)
        yield base, proc, started
    finally:
        stop_group(proc, grace_s)
        if log:
            out.close()  # type: ignore[union-attr]
