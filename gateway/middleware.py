"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it buffers and costs a task per request).

Per HTTP request: makes the gateway's own request id (32 hex characters) and puts it in
``scope["state"]["request_id"]`` for handlers (which forward it to the engine and record samples
and feedback under it); keeps a valid client ``X-Request-ID`` (the one rule of
``shared.traffic_records``: printable, at most 128 characters) as
``scope["state"]["client_request_id"]``. The response carries ``x-request-id`` (the client's id
when it sent one, else the gateway's) and ``x-tunegate-request-id`` (always the gateway's: the id
to give feedback on), with ``x-tunegate-sampled: 1`` when a handler sampled the request (see
``gateway.traffic_sampler``). A client never chooses the id its samples are stored under, so it
cannot aim at another key's rows. It also records the request count (route, status, model) and
latency.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gateway.metrics import OTHER, Metrics
from gateway.traffic_sampler import SAMPLED_HEADER
from shared.traffic_records import valid_request_id

Scope = dict[str, Any]


class RequestContext:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        client_rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                client_rid = value
                break
        own = os.urandom(16).hex().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = own.decode()
        if valid_request_id(client_rid):
            state["client_request_id"] = client_rid.decode()
        else:
            client_rid = own
        status_box = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", client_rid),
                                      (b"x-tunegate-request-id", own)]
                if state.get("sampled"):
                    message["headers"].append(SAMPLED_HEADER)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if path != "/metrics":
                self.metrics.requests.labels(path, str(status_box[0]),
                                             state.get("model_label", OTHER)).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)
