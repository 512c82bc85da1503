"""The gateway's spans (``shared.tracing`` holds the setup and the propagator).

Installed only when tracing is configured; otherwise every helper here is skipped by its call
site's ``tracing is None`` test, and :class:`TraceRequests` is not in the middleware stack.

Per request (one trace, the client's ``traceparent`` continued when it sends one):

- ``POST /v1/chat/completions`` (server): the whole request, ``http.*`` attributes, the
  request id;
- ``auth``, ``resolve model`` (``gen_ai.request.model``, ``tunegate.model.version``),
  ``quota``;
- ``choose replica``: ``tunegate.replica.url`` and ``tunegate.replica.reason`` (``affinity``:
  the replica already holds the version; ``least_loaded``; ``adapter_load``: the version is
  loaded there first), then ``adapter load`` when it is;
- ``chat <model>`` / ``text_completion <model>`` (client): the engine call under OpenTelemetry's
  GenAI conventions (``gen_ai.*``), with a ``gen_ai.first_token`` event on streams; its
  ``traceparent`` goes to the engine, which continues the trace.

The short spans (``auth`` to ``adapter load``) are recorded as timestamps while the request
runs and become SDK spans (with those times) once the response has been sent: creating a span is
the SDK's main cost, and this keeps it off the client's latency. The server and client spans are
live, since the engine needs the client span's ``traceparent``.

A shadow copy of a request runs in a trace of its own (it outlives the live request), as
``shadow <model>`` linked to the live request's server span. A canary request is the live
request itself: its spans carry ``tunegate.lane = canary`` and the promotion's id.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from shared.promotion import Route
from shared.registry import ResolvedModel
from shared.tracing import GEN_AI_OPERATIONS, NO_SPAN, Tracing


class Call(Protocol):
    """What spans read of a request (``gateway.serving.Call``); a protocol, so that tracing
    does not depend on the request path that calls it."""

    route: str
    body: dict[str, Any]
    resolved: ResolvedModel
    lane: str
    promotion: Route | None

    @property
    def request_id(self) -> str: ...

Scope = dict[str, Any]


class TraceRequests:
    """Pure ASGI middleware: one server span per HTTP request, current while it is handled."""

    def __init__(self, app: Any, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        parent = self.tracing.extract(carrier) if carrier else None
        method = scope.get("method", "GET")
        span = self.tracing.start(method, {"http.request.method": method,
                                           "url.path": scope.get("path", "")},
                                  kind="server", context=parent)
        marks = scope.setdefault("state", {})["trace_marks"] = Marks(self.tracing, span)
        token = context.attach(trace.set_span_in_context(span))
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status[0])
            rid = scope.get("state", {}).get("request_id")
            if rid:
                span.set_attribute("tunegate.request_id", rid)
            if status[0] >= 500:
                span.set_status(Status(StatusCode.ERROR))
            context.detach(token)
            marks.flush()  # the response is out: now the SDK spans of the short steps
            span.end()


class Marks:
    """A request's short steps, kept as ``(name, start ns, end ns, attributes, failed)`` until
    :meth:`flush` turns them into child spans of the request's server span."""

    __slots__ = ("tracing", "parent", "items", "flushed")

    def __init__(self, tracing: Tracing, parent: Any) -> None:
        self.tracing = tracing
        self.parent = parent
        self.items: list[tuple[str, int, int, dict[str, Any] | None, bool]] = []
        self.flushed = False

    def live(self) -> bool:
        """False once flushed, or where the current span is another one (a shadow copy's): then
        spans are made at once instead."""
        from opentelemetry import trace

        return not self.flushed and trace.get_current_span() is self.parent

    def flush(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        self.flushed = True
        ctx = trace.set_span_in_context(self.parent)
        for name, start, end, attrs, failed in self.items:
            s = self.tracing.start(name, attrs, context=ctx, start_time=start)
            if failed:
                s.set_status(Status(StatusCode.ERROR))
            s.end(end)
        self.items.clear()


class _Mark:
    """What ``with span(...)`` gives while the request's marks are live: ``set_attribute``
    like a span, timestamps instead of SDK work."""

    __slots__ = ("marks", "name", "attributes", "start")

    def __init__(self, marks: Marks, name: str, attributes: dict[str, Any] | None) -> None:
        self.marks, self.name = marks, name
        self.attributes = dict(attributes) if attributes else {}

    def __enter__(self) -> _Mark:
        self.start = time.time_ns()
        return self

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.attributes["error.type"] = type(exc).__name__
        self.marks.items.append((self.name, self.start, time.time_ns(), self.attributes,
                                 exc is not None))


def span(tracing: Tracing | None, state: dict[str, Any], name: str,
         attributes: dict[str, Any] | None = None) -> Any:
    """A child span of the current one for a ``with`` block (``state``: the request's
    ``scope["state"]``); nothing when tracing is off."""
    if tracing is None:
        return NO_SPAN
    marks = state.get("trace_marks")
    if marks is None or not marks.live():
        return tracing.span(name, attributes, current=False)
    return _Mark(marks, name, attributes)


def choose_replica(tracing: Tracing, state: dict[str, Any], url: str, in_flight: int,
                   reason: str, attempt: int) -> None:
    """An instant span recording which replica a request goes to, and why."""
    attrs: dict[str, Any] = {"tunegate.replica.url": url, "tunegate.replica.reason": reason,
                             "tunegate.replica.in_flight": in_flight}
    if attempt > 1:
        attrs["tunegate.replica.attempt"] = attempt
    marks = state.get("trace_marks")
    if marks is not None and marks.live():
        now = time.time_ns()
        marks.items.append(("choose replica", now, now, attrs, False))
    else:
        tracing.start("choose replica", attrs).end()


def replica_reason(held: bool, ref: str | None) -> str:
    """Why a replica was chosen: ``affinity`` (it holds the version), ``adapter_load`` (it will
    load it), or ``least_loaded`` (the base model: any replica, fewest in flight first)."""
    if ref is None:
        return "least_loaded"
    return "affinity" if held else "adapter_load"


def start_upstream(tracing: Tracing, call: Call, url: str) -> Any:
    """The GenAI client span of the engine call (ended by :func:`end_upstream`)."""
    op = GEN_AI_OPERATIONS.get(call.route, "chat")
    # Few attributes: each costs on the request path and again when exported. The request id
    # is on the server span.
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": op, "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": call.resolved.requested, "server.address": url,
        "tunegate.lane": call.lane,
    }
    if call.resolved.version is not None:
        attrs["tunegate.model.version"] = call.resolved.version
    if call.promotion is not None:
        attrs["tunegate.promotion.id"] = call.promotion.promotion_id
    for field, key in (("max_tokens", "gen_ai.request.max_tokens"),
                       ("temperature", "gen_ai.request.temperature"),
                       ("top_p", "gen_ai.request.top_p"), ("seed", "gen_ai.request.seed")):
        v = call.body.get(field)
        if isinstance(v, int | float) and not isinstance(v, bool):
            attrs[key] = v
    return tracing.start(f"{op} {call.resolved.requested}", attrs, kind="client")


def first_token(span: Any, since_s: float) -> None:
    span.add_event("gen_ai.first_token", {"tunegate.ttft_ms": round(since_s * 1000, 3)})


def usage(span: Any, data: Any) -> None:
    """``gen_ai.usage.*`` and the response's model, id and finish reasons, from a JSON answer or
    a stream's usage chunk."""
    if not isinstance(data, dict):
        return
    u = data.get("usage")
    if isinstance(u, dict):
        for field, key in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                           ("completion_tokens", "gen_ai.usage.output_tokens")):
            if isinstance(u.get(field), int):
                span.set_attribute(key, u[field])
    if isinstance(data.get("model"), str):
        span.set_attribute("gen_ai.response.model", data["model"])
    if isinstance(data.get("id"), str):
        span.set_attribute("gen_ai.response.id", data["id"])
    reasons = [c.get("finish_reason") for c in data.get("choices") or []
               if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)


def end_upstream(span: Any, *, status: int | None = None, error: BaseException | None = None,
                 ) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__name__)
    if error is not None or (status is not None and status >= 500):
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def shadow_span(tracing: Tracing, live: Call, candidate_ref: str) -> Any:
    """The root span of a shadow copy, in its own trace, linked to the live request's span."""
    from opentelemetry import context, trace

    live_span = trace.get_current_span()
    return tracing.span(f"shadow {live.resolved.requested}", {
        "tunegate.lane": "shadow", "tunegate.request_id": live.request_id,
        "gen_ai.request.model": candidate_ref}, context=context.Context(),
        links=tracing.link(live_span))
