"""Promotion on the request path: canary routing, shadow mirroring and per-lane counters.

- **Routing table**: the active promotions in shadow or canary (``shared.promotion``), read from
  SQL every ``refresh_s`` seconds by a background task, so a request costs a dict lookup. Only a
  bare ``NAME`` takes part; ``NAME:ALIAS`` and ``NAME@vN`` are pinned by the client.
- **Canary**: with probability ``canary_weight`` a bare ``NAME`` is answered by the candidate
  (lane ``canary``) instead of ``stable``.
- **Shadow**: with probability ``shadow_fraction`` a copy of a bare-``NAME`` request is sent to
  the candidate in a background task (never streamed, never returned, no quota). At most
  ``max_shadow`` copies run at a time; beyond that a copy is dropped (counted). Its answer is
  recorded through the sampler (lane ``shadow``, the live request's id) when one is installed.
- **Counters**: requests and errors (5xx, or a failure to reach an engine) of the candidate per
  promotion and lane, in one Redis hash per promotion (``tunegate:promotion:<id>``, fields
  ``canary:requests``, ``shadow:errors``, ...). Fire-and-forget: a Redis failure loses counts,
  never a request. The monitor's promotion tick reads them for the error-rate gate; only
  versions under promotion are counted, so the hot path for other names does no Redis call.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from anyio import to_thread
from prometheus_client import Counter

from gateway.tracing import shadow_span
from shared.errors import TunegateError
from shared.promotion import Promotions, Route
from shared.registry import ResolvedModel
from shared.tracing import NO_SPAN, current_traceparent

if TYPE_CHECKING:
    from gateway.auth import KeyInfo
    from gateway.upstream import UpstreamResponse

log = logging.getLogger("tunegate.gateway.promotion")
COUNTS_KEY = "tunegate:promotion:{id}"
COUNTS_TTL_S = 30 * 24 * 3600  # counters of a finished promotion expire after 30 days


class Call(Protocol):
    """What mirroring reads of the live request (``gateway.serving.Call``); a protocol, so this
    module does not depend on the request path that calls it."""

    key: KeyInfo
    route: str
    body: dict[str, Any]
    resolved: ResolvedModel
    state: Any  # gateway.state.GatewayState (its ``tracing``)
    lane: str
    promotion: Route | None

    @property
    def request_id(self) -> str: ...


# Sends a copy: the body and the candidate in, the engine's answer and its release out
# (``gateway.serving.send`` over the live request with those two replaced).
SendCopy = Callable[[dict[str, Any], ResolvedModel],
                    Awaitable[tuple["UpstreamResponse", Callable[[], None], str]]]


def counts_key(promotion_id: int) -> str:
    return COUNTS_KEY.format(id=promotion_id)


class PromotionRouting:
    def __init__(self, promotions: Promotions, redis: Any | None, metrics_registry: Any, *,
                 refresh_s: float = 2.0, max_shadow: int = 4,
                 rng: Callable[[], float] = random.random) -> None:
        self.promotions = promotions
        self.redis = redis
        self.refresh_s = refresh_s
        self.max_shadow = max_shadow
        self.rng = rng
        self.routes: dict[str, Route] = {}
        self._candidates: dict[int, ResolvedModel] = {}  # promotion id -> the candidate
        self._task: asyncio.Task[None] | None = None
        self._shadows: set[asyncio.Task[None]] = set()
        self.shadow_requests = Counter(
            "tunegate_gateway_shadow_requests", "Shadow copies by outcome (ok, error, dropped)",
            ["outcome"], registry=metrics_registry)
        for outcome in ("ok", "error", "dropped"):  # present (at 0) from the start
            self.shadow_requests.labels(outcome)

    # ---- the routing table -------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="promotion-routes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._shadows):
            t.cancel()
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not stop refreshing
                log.exception("reading promotions failed")

    async def refresh(self) -> None:
        routes = await to_thread.run_sync(self.promotions.routes)
        candidates: dict[int, ResolvedModel] = {}
        for r in routes.values():
            known = self._candidates.get(r.promotion_id)
            if known is None:
                known = await to_thread.run_sync(self.promotions.registry.resolve,
                                                 f"{r.name}@v{r.version}")
            candidates[r.promotion_id] = known
        self.routes, self._candidates = routes, candidates

    # ---- the request path --------------------------------------------------------------------
    def route(self, model: str, resolved: ResolvedModel) -> tuple[ResolvedModel, Route | None]:
        """``(what serves the request, the promotion when the request is its canary)``."""
        if not self.routes or model != resolved.name:
            return resolved, None
        r = self.routes.get(resolved.name)
        if r is None or r.state != "canary" or r.version == resolved.version:
            return resolved, None
        if self.rng() >= r.canary_weight:
            return resolved, None
        self.count(r, "canary", "requests")
        return replace(self._candidates[r.promotion_id], requested=model), r

    def shadow_route(self, model: str, resolved: ResolvedModel) -> Route | None:
        """The promotion to mirror this (stable-lane) request to, if any."""
        if not self.routes or model != resolved.name:
            return None
        r = self.routes.get(resolved.name)
        if r is None or r.state != "shadow" or r.version == resolved.version:
            return None
        return r if self.rng() < r.shadow_fraction else None

    def count(self, r: Route, lane: str, what: str) -> None:
        if self.redis is None:
            return
        task = asyncio.create_task(self._incr(r.promotion_id, f"{lane}:{what}"))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _incr(self, promotion_id: int, field: str) -> None:
        try:
            key = counts_key(promotion_id)
            pipe = self.redis.pipeline(transaction=False)  # type: ignore[union-attr]
            pipe.hincrby(key, field, 1)
            pipe.expire(key, COUNTS_TTL_S)
            await pipe.execute()
        except Exception as exc:  # counting is best effort
            log.debug("promotion counter %s: %s", field, exc)

    def failed(self, r: Route | None, lane: str, err: TunegateError) -> None:
        """Count an error of the candidate: a 5xx, or no engine reachable (not a client's 4xx)."""
        if r is not None and err.status >= 500:
            self.count(r, lane, "errors")

    def mirror(self, call: Call, r: Route, send: SendCopy,
               record: Callable[[dict[str, Any]], Any] | None) -> None:
        """Send a copy of ``call`` to the candidate in the background (bounded) with ``send``;
        ``record`` gets the shadow row (``shadow_record``)."""
        if sum(1 for t in self._shadows if t.get_name() == "shadow") >= self.max_shadow:
            self.shadow_requests.labels("dropped").inc()
            return
        # Copied now: the live request's body is changed on its way upstream (model name).
        body = copy.deepcopy(call.body)
        task = asyncio.create_task(self._shadow(call, body, r, send, record), name="shadow")
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, live: Call, body: dict[str, Any], r: Route, send: SendCopy,
                      record: Callable[[dict[str, Any]], Any] | None) -> None:
        body["stream"] = False
        body.pop("stream_options", None)
        candidate = self._candidates.get(r.promotion_id)
        if candidate is None:
            return
        start = time.perf_counter()
        self.count(r, "shadow", "requests")
        tracing = live.state.tracing
        with NO_SPAN if tracing is None else shadow_span(tracing, live, candidate.ref):
            status, text = await self._shadow_send(body, candidate, r, send)
        if record is not None:
            try:
                record(shadow_record(live, candidate, body, text, status,
                                     (time.perf_counter() - start) * 1000))
            except Exception:
                log.exception("recording a shadow answer failed")

    async def _shadow_send(self, body: dict[str, Any], candidate: ResolvedModel, r: Route,
                           send: SendCopy) -> tuple[int, str]:
        status, text = 200, ""
        try:
            resp, release, _ = await send(body, candidate)
            try:
                data = json.loads(await resp.read())
            finally:
                await resp.aclose()
                release()
            choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
            text = str((choice.get("message") or {}).get("content") or choice.get("text") or "")
            self.shadow_requests.labels("ok").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shadow failures are counted, never raised
            status = exc.status if isinstance(exc, TunegateError) else 500
            if status >= 500:
                self.count(r, "shadow", "errors")
            self.shadow_requests.labels("error").inc()
        return status, text


def shadow_record(live: Call, candidate: ResolvedModel, body: dict[str, Any], text: str,
                  status: int, latency_ms: float) -> dict[str, Any]:
    """A ``shared.traffic_records.TrafficSample`` row's fields for a shadow answer."""
    tp = current_traceparent()  # the live request's trace (the shadow's own links to it)
    return {"request_id": live.request_id, "trace_id": tp.split("-")[1] if tp else None,
            "key_id": live.key.id, "route": live.route,
            "model": live.resolved.requested, "name": candidate.name,
            "version": candidate.version, "lane": "shadow",
            "request": {**body, "model": live.resolved.requested}, "output": text,
            "status": status, "latency_ms": round(latency_ms, 2), "ttft_ms": None}
