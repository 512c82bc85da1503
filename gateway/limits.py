"""Authentication and body-size caps before any body is read (pure ASGI middleware), and the
depth check for JSON bodies.

``Guard`` runs on every HTTP request, in front of the routers:

- Paths in ``public`` (``/health``, ``/ready``; ``/metrics`` and the API docs when the operator
  opens them) pass as they are. Every other path needs ``Authorization: Bearer <key>`` and gets
  a 401 from the headers alone, before a byte of the body is received. The key found is left in
  ``scope["state"]["key"]`` for the routes' dependencies (no second lookup). The console's page
  and files (``/console``, ``/console/static/...``) are public too; without an
  ``Authorization`` header, a live console session cookie stands for its key here: the session
  and its key are left in ``scope["state"]["console_session"]``, and the routes' dependencies
  check its CSRF token and scope (``gateway.deps``) without looking it up again.
- Bodies are capped: ``upload_bytes`` for ``POST /v1/files`` with an admin key, ``body_bytes``
  everywhere else. A ``Content-Length`` over the cap is a 413 at once; a chunked body is counted
  as it arrives and a 413 is raised from ``receive`` when it passes the cap.

Scope checks (admin routes) stay in the routes' dependencies; the cap bounds what a user key can
send to an admin route before its 403.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.exceptions import HTTPException

from gateway.auth import bearer_secret, hash_key, unknown_key
from gateway.console_sessions import COOKIE, SCOPE_STATE, session_key
from gateway.tracing import span as trace_span
from shared.errors import AuthenticationFailed, InvalidRequest, error_body

Scope = dict[str, Any]
UPLOAD_PATH = "/v1/files"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")
CONSOLE_PAGE, CONSOLE_FILES = "/console", "/console/static/"
_SESSION_COOKIE = re.compile(rb"(?:^|;)\s*" + COOKIE.encode() + rb"=([^;\s]+)")


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"The request body is larger than {limit} bytes.")


class Guard:
    def __init__(self, app: Any, *, public: frozenset[str], body_bytes: int,
                 upload_bytes: int) -> None:
        self.app = app
        self.public = public
        self.body_bytes = body_bytes
        self.upload_bytes = upload_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in self.public or path == CONSOLE_PAGE
                or path.startswith(CONSOLE_FILES)):
            await self.app(scope, receive, send)
            return
        authorization = length = cookie = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"cookie":
                cookie = value
        cookie_token = _SESSION_COOKIE.search(cookie) if authorization is None and cookie else None
        state = scope.setdefault("state", {})
        try:
            if cookie_token is not None:
                found = await _session(scope, cookie_token.group(1).decode("latin-1"))
                key = found[1] if found is not None else None
            else:
                digest = hash_key(bearer_secret(authorization.decode("latin-1")
                                                if authorization is not None else None))
                tg = scope["app"].state.tg
                with trace_span(tg.tracing, state, "auth"):
                    key = await tg.keys.authenticate(digest)
            if key is None:
                raise unknown_key()
        except AuthenticationFailed as err:
            await _reply(send, err.status, err.to_dict(), err.headers)
            return
        if cookie_token is None:
            state["key"] = key
        else:  # the routes' dependencies check the session's CSRF token and scope
            state[SCOPE_STATE] = found
        limit = self.body_bytes
        if scope["path"] == UPLOAD_PATH and key.is_admin:
            limit = self.upload_bytes
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await _too_large(send, limit)
                return
            # h11 holds the client to its Content-Length: nothing more can arrive.
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counted, send)


async def _session(scope: Scope, token: str) -> tuple[Any, Any] | None:
    """A live console session and its key (401 ``session_expired`` when it ended); None where
    the console is off."""
    sessions = getattr(scope["app"].state, "console_sessions", None)
    if sessions is None:
        return None
    return await session_key(sessions, scope["app"].state.tg.keys, token)


async def _too_large(send: Any, limit: int) -> None:
    await _reply(send, 413, error_body(f"The request body is larger than {limit} bytes.",
                                       "invalid_request_error", code="request_too_large"), {})


async def _reply(send: Any, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": raw})


def check_depth(raw: bytes, max_depth: int) -> None:
    """400 when ``raw`` (JSON) nests arrays/objects deeper than ``max_depth``. Cheap for
    ordinary bodies: fewer opening brackets than the limit cannot nest deeper than it, and
    that count runs in C; only bodies with many brackets are scanned (strings removed first)."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    depth = 0
    for m in _BRACKETS.finditer(_STRING.sub(b"", raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise InvalidRequest(f"the JSON body nests deeper than {max_depth} levels",
                                     code="json_too_deep")
        else:
            depth -= 1


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``json.loads`` with the depth bound; any malformed body is a 400, never a 500."""
    check_depth(raw, max_depth)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
