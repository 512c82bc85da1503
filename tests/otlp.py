"""A real OTLP/HTTP traces endpoint inside the test process: ``POST /v1/traces`` with an
``ExportTraceServiceRequest`` (protobuf, optionally gzip), decoded with opentelemetry-proto."""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.procs import free_port


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)


class Collector:
    def __init__(self, decode: bool = True) -> None:
        self.decode = decode  # False: only count requests and bytes (a cheap sink for benches)
        self.spans: list[Span] = []
        self.requests = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def add(self, body: bytes) -> None:
        if not self.decode:
            with self.lock:
                self.requests += 1
                self.bytes += len(body)
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        found = []
        for rs in req.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append(Span(
                        service=service, name=s.name, trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(), kind=s.kind,
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        events=[e.name for e in s.events],
                        links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links]))
        with self.lock:
            self.spans.extend(found)
            self.requests += 1

    def wait_for(self, check: Callable[[list[Span]], bool], timeout_s: float = 30.0,
                 ) -> list[Span]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                spans = list(self.spans)
            if check(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def connected(spans: list[Span]) -> bool:
    """One root, and every other span's parent is in the set."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id or s.parent_id not in ids]
    return len(roots) == 1 and len({s.trace_id for s in spans}) == 1


@contextlib.contextmanager
def collector(decode: bool = True) -> Iterator[Collector]:
    col = Collector(decode)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            try:
                col.add(body)
            except Exception:
                self.send_response(400)
                self.end_headers()
                return
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", col.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield col
    finally:
        server.shutdown()
        server.server_close()


def otel_env(col: Collector) -> dict[str, str]:
    """The environment that points a process's traces at ``col`` (100% sampling, exported
    within 0.1 s)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": col.url, "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": ""}
