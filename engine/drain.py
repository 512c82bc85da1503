"""Graceful drain of an engine replica on SIGTERM (a Kubernetes pod being stopped, a scale-in):

1. deregister from the gateway, so no gateway process picks this replica any more;
2. keep serving for ``grace_s`` (gateways drop a deregistered replica at their next health
   round, every 2 s by default; a request that still arrives is answered);
3. stop accepting connections and let the requests in flight finish, at most ``timeout_s``;
4. exit.

A second SIGINT (Ctrl-C) skips the wait. Two shapes of the same sequence:

- embedded kind: :class:`DrainingServer`, a uvicorn server whose exit handler runs steps 1-2
  before uvicorn's own graceful shutdown (3, bounded by ``timeout_graceful_shutdown``);
- vLLM kind: :func:`supervise` runs vLLM as a child instead of ``exec``-ing it, so that the
  signal reaches tunegate first: it stops the registrar process (which deregisters), waits, then
  watches vLLM's ``/metrics`` until nothing is running or waiting, and only then passes SIGTERM on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import Any

import httpx
import uvicorn

log = logging.getLogger("tunegate.engine.drain")
# Next to uvicorn's own shutdown lines, in the embedded engine's log.
uvicorn_log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn, with ``deregister`` awaited and ``grace_s`` waited before it stops accepting.
    The in-flight bound is uvicorn's ``timeout_graceful_shutdown``."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        deregister: Callable[[], Awaitable[None]] | None,
        grace_s: float,
    ) -> None:
        super().__init__(config)
        self.deregister = deregister
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: Any = None  # concurrent.futures.Future of the drain, once started

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain is not None or not self.started:
            # Not serving yet, or a second signal: uvicorn's own (stop now; SIGINT twice:
            # do not wait for requests in flight either).
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        # Runs in the signal handler: hand the work to the event loop.
        self._drain = asyncio.run_coroutine_threadsafe(self._drain_then_exit(), self._loop)

    async def _drain_then_exit(self) -> None:
        uvicorn_log.info("draining: deregistering, then %.1f s before closing", self.grace_s)
        try:
            if self.deregister is not None:
                await asyncio.wait_for(self.deregister(), 10.0)
            await asyncio.sleep(self.grace_s)
        except Exception:  # whatever happens, the server still stops
            log.exception("drain step failed")
        finally:
            self.should_exit = True


def in_flight(base_url: str, timeout_s: float = 2.0) -> int | None:
    """Requests running or waiting on a replica, from its vLLM-named metrics (summed over
    models); None when ``/metrics`` cannot be read."""
    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def supervise(
    cmd: Sequence[str],
    env: dict[str, str],
    *,
    base_url: str,
    registrar: subprocess.Popen[bytes] | None,
    grace_s: float,
    timeout_s: float,
    poll_s: float = 0.5,
) -> int:
    """Run ``cmd`` (vLLM's server) as a child; on SIGTERM/SIGINT drain it (module docstring).
    Returns the child's exit code (128 + signal when a signal ended it)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Its own session: a signal to our process group (Ctrl-C, a supervisor's killpg) reaches
    # the server only through the drain. It still dies with us if we are killed (Linux).
    child = subprocess.Popen(
        list(cmd),
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    asked: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        asked.append(sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while child.poll() is None and not asked:
            time.sleep(0.1)
        if child.poll() is None:
            _drain_child(child, base_url, registrar, grace_s, timeout_s, poll_s, asked)
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    return 128 - code if code < 0 else code


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _drain_child(
    child: subprocess.Popen[bytes],
    base_url: str,
    registrar: subprocess.Popen[bytes] | None,
    grace_s: float,
    timeout_s: float,
    poll_s: float,
    asked: list[int],
) -> None:
    log.info(
        "draining %s: deregistering, then up to %.0f s for requests in flight", base_url, timeout_s
    )
    if registrar is not None and registrar.poll() is None:
        registrar.terminate()  # the registrar deregisters on SIGTERM, then exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            registrar.wait(10)
    deadline = time.monotonic() + grace_s + timeout_s
    end_of_grace = time.monotonic() + grace_s
    while child.poll() is None and len(asked) < 2 and time.monotonic() < deadline:
        if time.monotonic() >= end_of_grace and in_flight(base_url) in (0, None):
            break  # None: /metrics is gone, nothing left to wait for
        time.sleep(poll_s)
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
