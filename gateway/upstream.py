"""The HTTP client to engine replicas: one pooled ``aiohttp`` session (keep-alive) made in the
lifespan. Transport errors are translated into ``shared.errors`` here and only here.

aiohttp rather than httpx on this path: under 50 concurrent requests httpcore's pool spends most
of a request scanning its connections (profile: bench/README.md, gateway overhead); aiohttp's
connector is a dict lookup. httpx stays in the tests and tools.

- Connection refused / failed / timed out while connecting: :class:`ReplicaUnreachable`; no byte
  of the request reached the replica, so the router retries another one.
- The connection lost before the answer's headers (or, without streaming, before its whole
  body) arrived: :class:`ReplicaLost`. The replica died or restarted under the request; the
  client has received nothing, so the router retries another replica (the generation, if any
  had started, is lost with the replica that died).
- Any other transport failure: :class:`UpstreamError` (502); a timeout: :class:`UpstreamTimeout`
  (504). These are not retried: the replica may still be generating.
- An engine's own error answer (status >= 400) becomes the matching error class, keeping its
  message, param and code (both OpenAI's ``{"error": {...}}`` and vLLM's older flat shape).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from shared.errors import (
    InvalidRequest,
    NotFound,
    Overloaded,
    RateLimited,
    TunegateError,
    UpstreamError,
)


class ReplicaUnreachable(UpstreamError):
    """The replica could not be reached; nothing was sent, so another may be tried."""


class ReplicaLost(UpstreamError):
    """The connection to the replica broke before anything was passed to the client."""


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"


def translate(exc: BaseException, replica: str) -> UpstreamError:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ReplicaUnreachable(f"engine replica {replica} unreachable: {type(exc).__name__}")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"engine replica {replica} timed out ({type(exc).__name__})")
    return UpstreamError(f"engine replica {replica} failed: {type(exc).__name__}")


def translate_lost(exc: BaseException, replica: str) -> UpstreamError:
    """:func:`translate` for a failure before any byte went to the client: a broken connection
    becomes :class:`ReplicaLost` (retried elsewhere)."""
    err = translate(exc, replica)
    if type(err) is UpstreamError and isinstance(
            exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
            | aiohttp.ClientPayloadError | ConnectionError):
        return ReplicaLost(f"engine replica {replica} lost the connection: "
                           f"{type(exc).__name__}")
    return err


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def error_from_response(status: int, body: bytes) -> TunegateError:
    """The error an engine answered with, as one of ours (status kept where it maps)."""
    message, param, code = f"engine answered HTTP {status}", None, None
    try:
        data: Any = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param")
            code = err.get("code") if isinstance(err.get("code"), str) else None
    except ValueError:
        pass
    if status == 404:
        return NotFound(message, param=param, code=code)
    if status == 429:
        return RateLimited(message, retry_after_s=1)
    if 400 <= status < 500:
        return InvalidRequest(message, param=param, code=code)
    if status == 503:
        return Overloaded(message, code=code)
    return UpstreamError(message, code=code)


class UpstreamResponse:
    """An engine's answer; its body is read with :meth:`read` or :meth:`iter_chunks`, and
    :meth:`aclose` must be called (closing before the end aborts the engine's request)."""

    def __init__(self, resp: aiohttp.ClientResponse, replica: str) -> None:
        self._resp = resp
        self.replica = replica
        self.status_code = resp.status

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _TRANSPORT_ERRORS as exc:
            raise translate(exc, self.replica) from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            raise translate(exc, self.replica) from exc

    async def aclose(self) -> None:
        if not self._resp.content.at_eof():
            self._resp.close()  # drops the connection: the engine sees the client go away
        else:
            self._resp.release()


class Upstream:
    def __init__(self, *, connect_timeout_s: float, request_timeout_s: float,
                 max_connections: int, api_key: str | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s,
                                              sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30.0),
            timeout=self._timeout, auto_decompress=False, trust_env=False,
            skip_auto_headers=("User-Agent",),
            # The engines' shared secret, on every call (inference, health, adapter loading).
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None)

    async def aclose(self) -> None:
        await self.session.close()

    async def send(self, base: str, path: str, content: bytes, headers: dict[str, str],
                   *, stream: bool = False, timeout_s: float | None = None) -> UpstreamResponse:
        """POST ``content`` (JSON bytes). Without ``stream`` the body is read before returning."""
        timeout = (aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
                   if timeout_s is not None else self._timeout)
        try:
            resp = await self.session.post(base + path, data=content, headers=headers,
                                           timeout=timeout)
            if not stream:
                await resp.read()
        except _TRANSPORT_ERRORS as exc:
            # Nothing of this answer has reached the client yet.
            raise translate_lost(exc, base) from exc
        return UpstreamResponse(resp, base)

    async def get_json(self, base: str, path: str, timeout_s: float) -> tuple[int, Any]:
        try:
            async with self.session.get(base + path, timeout=aiohttp.ClientTimeout(
                    total=timeout_s)) as r:
                raw = await r.read()
                status = r.status
        except _TRANSPORT_ERRORS as exc:
            raise translate(exc, base) from exc
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None
