"""Routing over engine replicas: health, adapter affinity, least loaded, load-once.

- **Health**: every ``health_interval_s`` each replica gets ``GET /health`` and, when healthy,
  ``GET /v1/models`` (which adapters it holds: entries with a ``parent``; the base: the entry
  without). A replica that refuses a connection is marked down at once.
- **Order** for a request: healthy replicas already holding the version (fewest requests in
  flight first), then the other healthy ones (fewest in flight first). When none is healthy, all
  are tried (a check may be stale) and a refusal on each ends in 503.
- **Load once**: a version missing on the chosen replica is loaded there first
  (``POST /v1/load_lora_adapter``); concurrent requests for the same version on the same replica
  wait on one shared future, so one replica never loads one version twice at a time. Beyond
  ``max_adapters`` the least recently used adapter with nothing in flight is unloaded first.
- **Retired versions**: after each health round, a registry version (``NAME@vN``) that no alias
  points at any more is unloaded from a replica once nothing is in flight on it and it has not
  been used for ``unload_idle_s`` seconds (so after ``stable`` moves, the old version leaves when
  its last requests are done; a client pinning ``NAME@vN`` keeps it loaded by using it).
  Adapters whose names are not registry versions are never touched.
- **Registered replicas**: besides the static URLs from the settings, each health round reloads
  the URLs engines registered in SQL (``registered``, in a worker thread) and adds or drops
  :class:`Replica` objects to match. A dropped replica only stops getting new requests; those
  in flight hold their own reference and finish.
- **Across gateway processes** (with Redis, :mod:`gateway.placement`): a version's first load
  claims one replica, which the other processes then route to; a replica this process cannot
  reach is reported down to the others, which stop routing to it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from anyio import to_thread

from gateway.metrics import Metrics
from gateway.placement import DONE, Placement
from gateway.upstream import Upstream, error_from_response
from shared.errors import Overloaded, TunegateError, UpstreamError
from shared.registry import ResolvedModel

log = logging.getLogger("tunegate.gateway.routing")
_VERSION_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@v[0-9]+$")


@dataclass
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    base_model: str | None = None
    max_model_len: int | None = None  # tokens, as the replica's /v1/models reports it
    adapters: dict[str, float] = field(default_factory=dict)  # lora_name -> last use (monotonic)
    adapter_in_flight: dict[str, int] = field(default_factory=dict)
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    last_error: str | None = None
    last_check: float = 0.0  # wall clock, seconds
    down_since: float | None = None  # wall clock, seconds: when it was last marked down
    static: bool = True  # from the settings; False: registered in SQL

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "source": "static" if self.static else "registered",
                "healthy": self.healthy, "in_flight": self.in_flight,
                "base_model": self.base_model, "adapters": sorted(self.adapters),
                "loading": sorted(self.loading), "last_error": self.last_error,
                "last_check": self.last_check, "down_since": self.down_since}


class Router:
    def __init__(self, urls: list[str], upstream: Upstream, metrics: Metrics, *,
                 health_interval_s: float = 2.0, load_timeout_s: float = 120.0,
                 max_adapters: int = 8, base_model_name: str | None = None,
                 targets: Callable[[], set[str]] | None = None,
                 unload_idle_s: float = 10.0,
                 local_path: Callable[[ResolvedModel], str] | None = None,
                 registered: Callable[[], list[str]] | None = None) -> None:
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.registered = registered  # URLs registered in SQL (blocking: runs in a thread)
        self.upstream = upstream
        self.metrics = metrics
        self.health_interval_s = health_interval_s
        self.load_timeout_s = load_timeout_s
        self.max_adapters = max_adapters
        self.base_model_name = base_model_name
        self.targets = targets
        self.unload_idle_s = unload_idle_s
        # The folder an engine loads a version from: for a remote artifact store the version is
        # downloaded first (blocking I/O, so in a worker thread); None: ``resolved.path`` as is.
        self.local_path = local_path
        self.placement: Placement | None = None  # shared with the other gateway processes
        self._task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()

    # ---- health ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="replica-health")
        if self.placement is not None:
            self.placement.start(self.reported_down)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.placement is not None:
            await self.placement.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_all()
                await self.sweep()
            except Exception:  # a bug here must not stop health checking
                log.exception("health check round failed")

    async def sweep(self) -> None:
        """Unload retired registry versions that are idle (see the module docstring)."""
        if self.targets is None:
            return
        current = await to_thread.run_sync(self.targets)
        now = time.monotonic()
        for r in self.replicas:
            if not r.healthy:
                continue
            for ref, last_used in list(r.adapters.items()):
                if (ref in current or not _VERSION_REF.match(ref) or ref in r.loading
                        or r.adapter_in_flight.get(ref) or now - last_used < self.unload_idle_s):
                    continue
                log.info("unloading retired %s from %s", ref, r.url)
                await self.unload(r, ref)

    async def check_all(self) -> None:
        await self.sync_registered()
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def sync_registered(self) -> list[Replica]:
        """Match the registered replicas to SQL; returns the ones added (not checked yet)."""
        if self.registered is None:
            return []
        wanted = dict.fromkeys(u.rstrip("/") for u in await to_thread.run_sync(self.registered))
        have = {r.url for r in self.replicas}
        keep = [r for r in self.replicas if r.static or r.url in wanted]
        added = [Replica(u, static=False) for u in wanted if u not in have]
        for r in self.replicas:
            if not (r.static or r.url in wanted):
                log.info("replica %s deregistered (%d in flight)", r.url, r.in_flight)
                for gauge in (self.metrics.replica_healthy, self.metrics.replica_in_flight,
                              self.metrics.replica_adapters):
                    with contextlib.suppress(KeyError):
                        gauge.remove(r.url)
        for r in added:
            log.info("replica %s registered", r.url)
        # A new list rather than edits in place: code iterating the old one stays valid.
        self.replicas = keep + added
        return added

    async def check(self, r: Replica) -> None:
        timeout = max(1.0, min(5.0, self.health_interval_s))
        try:
            status, _ = await self.upstream.get_json(r.url, "/health", timeout)
            if status != 200:
                raise UpstreamError(f"/health answered {status}")
            status, models = await self.upstream.get_json(r.url, "/v1/models", timeout)
            if status == 200 and isinstance(models, dict):
                self._read_models(r, models)
            r.healthy, r.last_error, r.down_since = True, None, None
        except TunegateError as exc:
            self.mark_down(r, exc.message)
        r.last_check = time.time()
        self.metrics.replica_healthy.labels(r.url).set(1 if r.healthy else 0)
        # Read when scraped: nothing on the request path.
        self.metrics.replica_in_flight.labels(r.url).set_function(partial(_in_flight, r))
        self.metrics.replica_adapters.labels(r.url).set_function(partial(_held, r))

    def _read_models(self, r: Replica, models: dict[str, Any]) -> None:
        held: set[str] = set()
        for m in models.get("data") or []:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str):
                continue
            if m.get("parent"):
                held.add(m["id"])
            elif r.base_model is None or m["id"] == r.base_model:
                r.base_model = m["id"]
                ctx = m.get("max_model_len")
                if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
                    r.max_model_len = ctx
        now = time.monotonic()
        for name in held - r.adapters.keys():
            r.adapters[name] = now
        for name in r.adapters.keys() - held:
            if name not in r.loading and not r.adapter_in_flight.get(name):
                del r.adapters[name]

    def mark_down(self, r: Replica, reason: str) -> bool:
        """Mark ``r`` down; True when it was not down already."""
        was_up = r.down_since is None
        if was_up:
            r.down_since = time.time()
        r.healthy, r.last_error = False, reason
        self.metrics.replica_healthy.labels(r.url).set(0)
        return was_up

    def reported_down(self, url: str) -> None:
        """Another gateway process could not reach ``url``: stop routing to it here too (the
        health check admits it again once it answers)."""
        for r in self.replicas:
            if r.url == url and r.healthy:
                log.info("replica %s reported down by another gateway", url)
                self.mark_down(r, "reported unreachable by another gateway process")

    def max_model_len(self) -> int | None:
        """The smallest context length the replicas report, tokens (None: none reports one)."""
        known = [r.max_model_len for r in self.replicas if r.max_model_len]
        return min(known) if known else None

    # ---- choice ------------------------------------------------------------------------------
    def order(self, ref: str | None) -> list[Replica]:
        healthy = [r for r in self.replicas if r.healthy] or list(self.replicas)
        holders = sorted((r for r in healthy if ref is not None and ref in r.adapters),
                         key=lambda r: r.in_flight)
        others = sorted((r for r in healthy if ref is None or ref not in r.adapters),
                        key=lambda r: r.in_flight)
        return holders + others

    async def placed(self, ref: str | None, replicas: list[Replica]) -> list[Replica]:
        """``replicas`` (from :meth:`order`) with the one claimed for ``ref`` first, when no
        replica is known here to hold it (its first load, as far as this process knows)."""
        if (ref is None or self.placement is None or not replicas
                or ref in replicas[0].adapters or ref in replicas[0].loading):
            return replicas
        alive = {r.url for r in replicas if r.healthy}
        claim = await self.placement.claim(ref, replicas[0].url, alive)
        if claim is None:
            return replicas
        owner = claim[0]
        return sorted(replicas, key=lambda r: r.url != owner)  # stable: the rest keep order

    def upstream_model(self, r: Replica, resolved: ResolvedModel) -> str:
        """The ``model`` to send: the version's ``lora_name``, or the replica's base id."""
        if not resolved.is_base:
            return resolved.ref
        return self.base_model_name or r.base_model or resolved.ref

    def acquire(self, r: Replica, ref: str | None) -> Callable[[], None]:
        """Count a request in flight on ``r`` (and on adapter ``ref``); returns the idempotent
        release function."""
        r.in_flight += 1
        if ref is not None:
            r.adapter_in_flight[ref] = r.adapter_in_flight.get(ref, 0) + 1
            r.adapters[ref] = time.monotonic()
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            r.in_flight -= 1
            if ref is not None:
                r.adapter_in_flight[ref] -= 1

        return release

    # ---- adapters ----------------------------------------------------------------------------
    async def ensure_loaded(self, r: Replica, resolved: ResolvedModel) -> None:
        ref = resolved.ref
        if ref in r.adapters:
            r.adapters[ref] = time.monotonic()
            return
        pending = r.loading.get(ref)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        r.loading[ref] = fut
        try:
            await self._load_claimed(r, resolved)
            r.adapters[ref] = time.monotonic()
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            r.loading.pop(ref, None)

    async def _load_claimed(self, r: Replica, resolved: ResolvedModel) -> None:
        """Load ``resolved`` on ``r``, unless another gateway process claimed ``r`` for it: then
        wait until ``r`` holds it (or the claim goes: that load failed, so load it here)."""
        ref, placement = resolved.ref, self.placement
        if placement is None:
            await self._load(r, resolved)
            return
        claim = await placement.claim(ref, r.url, {x.url for x in self.replicas if x.healthy})
        if claim is None or claim[1]:
            try:
                await self._load(r, resolved)
            except BaseException:
                if claim is not None:
                    await placement.settle(ref, r.url, loaded=False)
                raise
            if claim is not None:
                await placement.settle(ref, r.url, loaded=True)
            return
        deadline = time.monotonic() + self.load_timeout_s
        while claim[0] == r.url and time.monotonic() < deadline:
            state = await placement.claim_state(ref)
            if state is None or state == f"{r.url}|{DONE}" or not state.startswith(r.url + "|"):
                break  # loaded (the engine answers "already"), or the claimant's load failed
            await asyncio.sleep(0.1)
            await self.check(r)
            if ref in r.adapters:
                self.metrics.adapter_loads.labels(r.url, "already").inc()
                return
            if not r.healthy:
                break
        await self._load(r, resolved)

    async def _load(self, r: Replica, resolved: ResolvedModel) -> None:
        await self._evict(r)
        path = resolved.path
        if self.local_path is not None:
            path = await to_thread.run_sync(self.local_path, resolved)
        body = json.dumps({"lora_name": resolved.ref, "lora_path": path}).encode()
        resp = await self.upstream.send(r.url, "/v1/load_lora_adapter", body,
                                        {"content-type": "application/json"},
                                        timeout_s=self.load_timeout_s)
        raw = await resp.read()
        await resp.aclose()
        if resp.status_code == 200:
            self.metrics.adapter_loads.labels(r.url, "loaded").inc()
            return
        # Already loaded (by another gateway process, say) is success: ask the replica.
        await self.check(r)
        if resolved.ref in r.adapters:
            self.metrics.adapter_loads.labels(r.url, "already").inc()
            return
        self.metrics.adapter_loads.labels(r.url, "failed").inc()
        err = error_from_response(resp.status_code, raw)
        raise UpstreamError(f"loading {resolved.ref} on {r.url} failed: {err.message}")

    async def _evict(self, r: Replica) -> None:
        while len(r.adapters) >= self.max_adapters:
            idle = [(t, n) for n, t in r.adapters.items() if not r.adapter_in_flight.get(n)]
            if not idle:
                return  # everything is busy: let the engine decide
            _, victim = min(idle)
            await self.unload(r, victim)

    async def unload(self, r: Replica, ref: str) -> None:
        r.adapters.pop(ref, None)
        body = json.dumps({"lora_name": ref}).encode()
        try:
            resp = await self.upstream.send(r.url, "/v1/unload_lora_adapter", body,
                                            {"content-type": "application/json"},
                                            timeout_s=self.load_timeout_s)
            await resp.aclose()
        except UpstreamError as exc:
            log.warning("unloading %s from %s failed: %s", ref, r.url, exc.message)

    def no_replica(self) -> Overloaded:
        return Overloaded("No engine replica is reachable.", code="no_replica")

    def unreachable(self, r: Replica, exc: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(r.url, "unreachable").inc()
        if self.mark_down(r, exc.message) and self.placement is not None:
            # Told to the other gateway processes in the background: the retry goes on now.
            task = asyncio.create_task(self.placement.report_down(r.url))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)


def _in_flight(r: Replica) -> float:
    return r.in_flight


def _held(r: Replica) -> float:
    return len(r.adapters)
