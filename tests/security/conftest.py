"""Fixtures of the gateway hardening tests: a fake replica that reports usage as an engine running
to its limit would (``bench/fake_upstream.py --full-usage``), gateway processes, keys, and raw
HTTP for requests whose body is never sent."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import FAKE, Records
from tests.procs import free_port, run_server

FAKE_MAX_MODEL_LEN = 2048  # tokens, reported by the fake replica's /v1/models


@contextlib.contextmanager
def full_usage_replica(name: str = "r1") -> Iterator[str]:
    port = free_port()
    with run_server([sys.executable, str(FAKE), "--port", str(port), "--name", name,
                     "--full-usage", "--max-model-len", str(FAKE_MAX_MODEL_LEN)],
                    port=port, timeout_s=30) as (url, _):
        yield url


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with full_usage_replica() as url:
        yield url


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sec")


@pytest.fixture(scope="module")
def records(data_dir: Path) -> Records:
    return Records(data_dir)


def head_only(base: str, method: str, path: str, headers: dict[str, str],
              timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Send a request's headers (with their Content-Length) and none of its body; return the
    status and body of the answer that comes back anyway. A server that waits for the body
    before answering times out here (socket.timeout)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        s.sendall("\r\n".join(lines).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split(b" ")[1]), body
