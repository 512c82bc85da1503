"""Engine replicas register themselves with a gateway (``tunegate engine serve --register``).

A :class:`Registrar` waits until the engine's own ``/health`` answers 200, registers its
advertised URL (``POST /admin/replicas``, an ``engine``-scope key is enough), repeats that
every ``interval_s`` (the call is idempotent: a gateway whose database forgot the engine
learns it again) and deregisters (``DELETE /admin/replicas?url=...``) when told to stop. A
gateway that cannot be reached or refuses is logged and retried; it never stops the engine.

- Embedded kind: :func:`attach` runs the registrar as a task inside the engine's own lifespan.
- vLLM kind: ``serve_vllm`` replaces the process by vLLM (``exec``), so :func:`spawn` first starts
  ``python -m engine.register`` in a session of its own (a Ctrl-C meant for the engine does not
  kill it before it deregisters). It watches its parent: ``exec`` keeps the PID, so when its
  parent PID changes (the engine is gone, the registrar was re-parented) it deregisters and
  exits. The admin key travels in its environment, never on its command line (``ps``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.replicas import replica_url
from shared.settings import LOCAL_KEY_FILE, StorageSettings

log = logging.getLogger("tunegate.engine.register")

KEY_ENV = "TUNEGATE_ENGINE_REGISTER_KEY"


class RegisterSettings(BaseSettings):
    """``TUNEGATE_ENGINE_REGISTER_*``: the admin key used to register (``..._KEY``; default: the
    local admin key file ``tunegate up`` writes) and the heartbeat, seconds."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_ENGINE_REGISTER_", extra="ignore")

    key: SecretStr | None = None
    interval_s: float = Field(default=30.0, gt=0)  # re-registration period, seconds
    timeout_s: float = Field(default=10.0, gt=0)  # per call to the gateway, seconds


def advertise_url(host: str, port: int) -> str:
    """``http://HOST:PORT``; a wildcard bind address (0.0.0.0, ::) becomes 127.0.0.1, which only
    a gateway on the same machine can reach: pass ``--advertise-url`` otherwise."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def admin_key(given: str | None = None, settings: RegisterSettings | None = None,
              data_dir: Path | None = None) -> str | None:
    """``given``, else ``TUNEGATE_ENGINE_REGISTER_KEY``, else the local admin key file in the data
    folder; None when there is none."""
    if given:
        return given
    settings = settings or RegisterSettings()
    if settings.key is not None:
        return settings.key.get_secret_value()
    path = (data_dir or StorageSettings().data_dir) / LOCAL_KEY_FILE
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


class Registrar:
    """Keeps ``url`` (the engine's advertised base URL) registered with ``gateway``; the engine's
    readiness is read at ``health_url`` (default: ``url``; the local address when the advertised
    one only resolves elsewhere, e.g. behind a load balancer)."""

    def __init__(self, gateway: str, url: str, key: str, *, kind: str | None = None,
                 health_url: str | None = None, interval_s: float = 30.0,
                 timeout_s: float = 10.0, retry_s: float = 2.0) -> None:
        self.gateway = gateway.rstrip("/")
        self.url = replica_url(url)  # shared.errors.InvalidRequest when it is not a base URL
        self.health_url = (health_url or self.url).rstrip("/")
        self.key = key
        self.kind = kind
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s  # between /health polls; first wait after a failure, seconds
        self._headers = {"Authorization": f"Bearer {key}"}
        self.registered = False  # the last registration succeeded

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: wait for the engine, then register every ``interval_s``;
        deregister at the end when a registration was tried."""
        tried = False
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            try:
                while not stop.is_set() and not await self._engine_up(client):
                    await _wait(stop, self.retry_s)
                backoff = self.retry_s  # doubles per failed registration, up to interval_s
                while not stop.is_set():
                    tried = True
                    self.registered = await self._register(client)
                    if self.registered:
                        backoff = self.retry_s
                        await _wait(stop, self.interval_s)
                    else:
                        await _wait(stop, backoff)
                        backoff = min(2 * backoff, self.interval_s)
            finally:
                if tried:
                    await self._deregister(client)

    async def _engine_up(self, client: httpx.AsyncClient) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return (await client.get(self.health_url + "/health")).status_code == 200
        return False

    async def _register(self, client: httpx.AsyncClient) -> bool:
        try:
            r = await client.post(self.gateway + "/admin/replicas", headers=self._headers,
                                  json={"url": self.url, "kind": self.kind})
        except httpx.HTTPError as exc:
            log.warning("registering %s with %s failed: %s", self.url, self.gateway, exc)
            return False
        if r.status_code not in (200, 201):
            log.warning("registering %s with %s failed: %s %s", self.url, self.gateway,
                        r.status_code, r.text[:300])
            return False
        if r.status_code == 201 or not self.registered:
            log.info("registered %s with %s", self.url, self.gateway)
        return True

    async def _deregister(self, client: httpx.AsyncClient) -> None:
        try:
            # At most 5 s: an engine shutting down should not wait long on a gateway that is gone.
            r = await client.delete(self.gateway + "/admin/replicas", headers=self._headers,
                                    params={"url": self.url}, timeout=min(self.timeout_s, 5.0))
        except httpx.HTTPError as exc:
            log.warning("deregistering %s from %s failed: %s", self.url, self.gateway, exc)
            return
        if r.status_code in (200, 404):
            log.info("deregistered %s from %s", self.url, self.gateway)
        else:
            log.warning("deregistering %s from %s failed: %s %s", self.url, self.gateway,
                        r.status_code, r.text[:300])
        self.registered = False


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def attach(app: FastAPI, registrar: Registrar) -> Callable[[], Awaitable[None]]:
    """Run ``registrar`` inside ``app``'s lifespan (after the app's own startup, stopped, which
    deregisters, before the app's own shutdown). Returns a coroutine function that stops it
    (deregistering) earlier, while the app still serves: the first step of a drain."""
    inner = app.router.lifespan_context
    running: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            stop = asyncio.Event()
            task = asyncio.create_task(registrar.run(stop), name="engine-registrar")
            running.update(stop=stop, task=task)
            try:
                yield state
            finally:
                stop.set()
                await task

    async def deregister_now() -> None:
        if "stop" in running:
            running["stop"].set()
            await asyncio.shield(running["task"])

    app.router.lifespan_context = lifespan
    return deregister_now


def spawn(registrar: Registrar) -> subprocess.Popen[bytes]:
    """Run ``registrar`` in a process of its own on behalf of this (soon exec'd) process; see
    the module docstring."""
    cmd = [sys.executable, "-m", "engine.register", "--gateway", registrar.gateway,
           "--url", registrar.url, "--health-url", registrar.health_url,
           "--parent-pid", str(os.getpid())]
    if registrar.kind:
        cmd += ["--kind", registrar.kind]
    env = {**os.environ, KEY_ENV: registrar.key,
           "TUNEGATE_ENGINE_REGISTER_INTERVAL_S": str(registrar.interval_s),
           "TUNEGATE_ENGINE_REGISTER_TIMEOUT_S": str(registrar.timeout_s)}
    # Not waited for: exec replaces this process, and the registrar outlives it on purpose.
    return subprocess.Popen(cmd, env=env, start_new_session=True)


async def _watch_parent(parent_pid: int, stop: asyncio.Event, poll_s: float = 0.5) -> None:
    # A changed parent PID means the engine exited and this process was re-parented; comparing
    # PIDs rather than probing one is safe from PID reuse.
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.info("engine process %d is gone", parent_pid)
            stop.set()
            return
        await _wait(stop, poll_s)


async def _main(registrar: Registrar, parent_pid: int) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent_pid, stop))
    try:
        await registrar.run(stop)
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.register",
                                description="Keep an engine registered with a gateway while its "
                                            "process (--parent-pid) lives.")
    p.add_argument("--gateway", required=True)
    p.add_argument("--url", required=True, help="the engine's advertised base URL")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--kind", default=None)
    p.add_argument("--health-url", default=None, help="where to poll the engine (default: --url)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s registrar %(message)s")
    settings = RegisterSettings()
    key = admin_key(settings=settings)
    if key is None:
        log.error("no admin key: set %s", KEY_ENV)
        return 2
    registrar = Registrar(args.gateway, args.url, key, kind=args.kind, health_url=args.health_url,
                          interval_s=settings.interval_s, timeout_s=settings.timeout_s)
    asyncio.run(_main(registrar, args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
