"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it buffers and costs a task per request).

Per HTTP request: takes ``X-Request-ID`` (printable, at most 128 characters) or makes one, puts it
in ``scope["state"]["request_id"]`` for handlers (which forward it to the engine), returns it in
the response headers (with ``x-tunegate-sampled: 1`` when a handler sampled the request, see
``gateway.traffic_sampler``), and records the request count (route, status, model) and latency.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gateway.metrics import OTHER, Metrics
from gateway.traffic_sampler import SAMPLED_HEADER

Scope = dict[str, Any]


def _valid_id(raw: bytes) -> bool:
    return 0 < len(raw) <= 128 and all(33 <= b < 127 for b in raw)


class RequestContext:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        if not _valid_id(rid):
            rid = os.urandom(16).hex().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = rid.decode()
        status_box = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
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
