"""Traffic sampling: a share of served requests is recorded for evaluation and training.

Which requests: each inference request is drawn with probability ``rate`` after its model is
resolved: the key's own ``sample_rate`` when set (0 opts the key out), else the adapter name's
entry in ``sample_rate_by_model``, else ``sample_rate`` (1% by default). Without Redis nothing is
sampled. A sampled request's response carries ``x-tunegate-sampled: 1`` (added by
``gateway.middleware``), so a client knows feedback on its ``x-tunegate-request-id`` (the id the
gateway made; a client's own ``X-Request-ID`` is only kept alongside) will be accepted.

What is recorded (``shared.traffic_records.SampleRecord``): the client's body as sent, the answer
text (streams reassembled from the SSE deltas that passed through), the model asked for, the
resolved name and version, the lane, key id, HTTP status (499 when the client left mid-stream),
latency and time to first token (streams) in ms, the request id and the trace id (the current
OpenTelemetry span's when there is one, else the W3C ``traceparent`` header's, else none).

Off the request path: the request only copies its body (a shallow dict copy) and appends a dict
to an in-memory buffer (bounded: ``sample_buffer`` records, more are dropped and counted). One
background task per process wakes when records arrive, waits ``sample_flush_s`` to batch them,
then reassembles stream text, scrubs (``gateway.scrub``, depth bounded), encodes and writes the
batch with one pipelined round trip: ``XADD <sample_stream> MAXLEN ~ <sample_stream_maxlen>``
per record. Redis errors drop the batch, count
``tunegate_gateway_samples_total{outcome="failed"}``, log once per outage and back off
``redis_retry_after_s``; a client never sees them. A record that cannot be
scrubbed or encoded (whatever the reason) is dropped and counted alone: the rest of its batch is
written.

Recorder API, for other parts of the gateway (the shadow lane records its answers with it)::

    state.sampler.submit(record, force=True) -> bool

``record`` is a dict with ``SampleRecord``'s fields: ``request_id``, ``trace_id``, ``key_id``,
``route``, ``model``, ``name``, ``version``, ``lane``, ``request`` (a JSON object), ``output``
(text), ``status``, ``latency_ms``, ``ttft_ms`` and optionally ``created_at`` (unix seconds; now
by default). With ``force=False`` the record is kept with the sampling rate of its ``name``.
Returns whether it was queued; it never raises for Redis problems and never waits on I/O.
Records with the same ``(request_id, lane)`` are stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from gateway.metrics import Metrics
from gateway.scrub import load_scrubber, scrub_value
from gateway.settings import GatewaySettings
from shared.traffic_records import ENTRY_FIELD, OWNER_TTL_S, owner_key

if TYPE_CHECKING:
    from fastapi import Request

    from gateway.auth import KeyInfo
    from shared.registry import ResolvedModel

log = logging.getLogger("tunegate.gateway.sampling")

SAMPLED_HEADER = (b"x-tunegate-sampled", b"1")


class Call(Protocol):
    """What the sampler reads of a request on its way (``gateway.serving.Call``); a protocol, so
    this module does not depend on the request path that calls it."""

    request: Request
    key: KeyInfo
    route: str
    body: dict[str, Any]
    resolved: ResolvedModel
    start: float
    lane: str
    sample: dict[str, Any] | None

    @property
    def request_id(self) -> str: ...
_BATCH = 500  # records per pipelined write


class Sampler:
    def __init__(self, settings: GatewaySettings, metrics: Metrics, redis: Any | None) -> None:
        self.redis = redis
        self.metrics = metrics
        self.default_rate = settings.sample_rate
        self.by_model = dict(settings.sample_rate_by_model)
        self.stream = settings.sample_stream
        self.maxlen = settings.sample_stream_maxlen
        self.capacity = settings.sample_buffer
        self.flush_s = settings.sample_flush_s
        self.retry_after_s = settings.redis_retry_after_s
        self.scrub = load_scrubber(settings.sample_scrubber)
        self._buf: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False
        self._otel_trace_id = _otel_getter()
        if redis is None:
            log.warning("no REDIS_URL: traffic is not sampled")

    # ---- request path ------------------------------------------------------------------------
    def rate(self, key: KeyInfo, name: str) -> float:
        if self.redis is None:
            return 0.0
        if key.sample_rate is not None:
            return key.sample_rate
        return self.by_model.get(name, self.default_rate)

    def consider(self, call: Call) -> None:
        """Draw whether ``call`` is sampled; when it is, keep a copy of its body (``send`` rewrites
        ``model`` and ``stream_options`` in place) and flag the response."""
        rate = self.rate(call.key, call.resolved.name)
        if rate <= 0.0 or (rate < 1.0 and random.random() >= rate):
            return
        call.sample = dict(call.body)
        call.request.scope["state"]["sampled"] = True

    def record(self, call: Call, status: int, *, output: str | None = None,
               events: list[bytes] | None = None, ttft_s: float | None = None) -> None:
        """Queue the record of a sampled call that ended: ``output`` is the answer's text, or
        ``events`` the raw SSE events (reassembled later, off the request path)."""
        now = time.perf_counter()
        elapsed = now - call.start
        rec: dict[str, Any] = {
            "request_id": call.request_id,
            "client_request_id": call.request.scope["state"].get("client_request_id"),
            "trace_id": self.trace_id(call.request),
            "key_id": call.key.id, "route": call.route, "model": call.resolved.requested,
            "name": call.resolved.name, "version": call.resolved.version, "lane": call.lane,
            "request": call.sample, "output": output or "", "status": status,
            "latency_ms": round(elapsed * 1000, 3),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
            "created_at": time.time() - elapsed,
        }
        if events is not None:
            rec["_events"] = events
        self._enqueue(rec)

    def submit(self, record: dict[str, Any], force: bool = True) -> bool:
        """Queue a finished record (see the module's docstring)."""
        if self.redis is None:
            self.metrics.samples.labels("no_redis").inc()
            return False
        if not force:
            rate = self.by_model.get(str(record.get("name")), self.default_rate)
            if rate <= 0.0 or random.random() >= rate:
                return False
        rec = dict(record)
        rec.setdefault("created_at", time.time())
        return self._enqueue(rec)

    def trace_id(self, request: Request) -> str | None:
        if self._otel_trace_id is not None:
            found = self._otel_trace_id()
            if found:
                return found
        return parse_traceparent(request.headers.get("traceparent"))

    def _enqueue(self, rec: dict[str, Any]) -> bool:
        if len(self._buf) >= self.capacity or self._closing:
            self.metrics.samples.labels("dropped").inc()
            return False
        self._buf.append(rec)
        if not self._wake.is_set():
            self._wake.set()
        return True

    # ---- background writer -----------------------------------------------------------------
    async def start(self) -> None:
        if self.redis is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="tunegate-sampler")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush what is buffered (at most ``timeout_s`` seconds), then stop the writer."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                await asyncio.sleep(self.flush_s)  # let a batch gather: one round trip for all
            while self._buf:
                batch = [self._buf.popleft() for _ in range(min(_BATCH, len(self._buf)))]
                try:
                    await self._write(batch)
                except Exception:  # the writer must outlive any bad record or client bug
                    self.metrics.samples.labels("failed").inc(len(batch))
                    log.exception("writing %d sampled records failed", len(batch))
            if self._closing:
                return

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        from redis.exceptions import RedisError

        pipe = self.redis.pipeline(transaction=False)  # type: ignore[union-attr]
        n = 0
        for rec in batch:
            try:
                payload = self.encode(rec)
            except Exception as exc:  # user-shaped data or an operator's scrubber: drop it alone
                self.metrics.samples.labels("failed").inc()
                log.warning("a sampled record could not be scrubbed or encoded: %s",
                            type(exc).__name__)
                continue
            pipe.xadd(self.stream, {ENTRY_FIELD: payload}, maxlen=self.maxlen, approximate=True)
            if rec.get("key_id") and rec.get("lane") != "shadow":
                pipe.set(owner_key(self.stream, str(rec["key_id"]), str(rec["request_id"])), b"1",
                         ex=OWNER_TTL_S)
            n += 1
        if not n:
            return
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self.metrics.samples.labels("failed").inc(n)
            if not self._failing:
                log.warning("Redis unavailable, sampled records are dropped: %r", exc)
            self._failing = True
            if not self._closing:
                await asyncio.sleep(self.retry_after_s)
            return
        if self._failing:
            log.warning("Redis reachable again: sampled records are written")
            self._failing = False
        self.metrics.samples.labels("written").inc(n)

    def encode(self, rec: dict[str, Any]) -> bytes:
        """Reassemble, scrub and serialize one record (the stream entry's value)."""
        events = rec.pop("_events", None)
        if events is not None:
            rec["output"] = stream_text(events)
        if self.scrub is not None:
            rec["request"] = scrub_value(rec.get("request"), self.scrub)
            if rec.get("output"):
                rec["output"] = self.scrub(str(rec["output"]))
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode()


def stream_text(events: list[bytes]) -> str:
    """The answer's text from OpenAI SSE events (chat deltas or completion text, choice 0)."""
    parts: list[str] = []
    for ev in events:
        for line in ev.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            for choice in data.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(piece, str):
                    parts.append(piece)
    return "".join(parts)


def answer_text(data: Any) -> str:
    """The answer's text of a non-streaming chat or completion response (choice 0)."""
    try:
        choice = data["choices"][0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    trace = parts[1].lower()
    if trace == "0" * 32 or any(c not in "0123456789abcdef" for c in trace):
        return None
    return trace


def _otel_getter() -> Callable[[], str | None] | None:
    """The current span's trace id when OpenTelemetry is installed (the API only: without an SDK
    configured there never is a valid span, and this returns None)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None

    def current() -> str | None:
        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    return current
