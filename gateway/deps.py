"""``Annotated`` dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import (
    KeyInfo,
    admin_only,
    bearer_secret,
    hash_key,
    not_for_engine,
    replica_only,
    unknown_key,
)
from gateway.console_sessions import (
    COOKIE,
    CSRF_HEADER,
    SAFE_METHODS,
    SessionStore,
    session_key,
)
from gateway.state import GatewayState
from shared.errors import PermissionDenied


async def get_state(request: Request) -> GatewayState:
    # async: FastAPI would run a plain function in a worker thread, on every request.
    return request.app.state.tg  # type: ignore[no-any-return]


State = Annotated[GatewayState, Depends(get_state)]


async def any_key(request: Request) -> KeyInfo:
    """The caller's key of any scope: 401 when missing, malformed, unknown or revoked.
    ``gateway.limits`` has usually looked it up already, from the headers, before the body was
    read. Without an ``Authorization`` header, a console session cookie stands for its admin key
    (``gateway.console_sessions``): any method but GET/HEAD/OPTIONS must then carry the
    session's CSRF token."""
    found = request.scope.get("state", {}).get("key")
    if found is not None:
        request.scope["state"]["key_id"] = found.id
        return found  # type: ignore[no-any-return]
    header = request.headers.get("authorization")
    sessions = getattr(request.app.state, "console_sessions", None)
    if header is None and sessions is not None and COOKIE in request.cookies:
        info = await _session_key(request, sessions)
    else:
        digest = hash_key(bearer_secret(header))
        info = await request.app.state.tg.keys.authenticate(digest)
    if info is None:
        raise unknown_key()
    request.scope.setdefault("state", {})["key_id"] = info.id
    return info  # type: ignore[no-any-return]


async def current_key(request: Request) -> KeyInfo:
    """A user or admin key (an ``engine`` key only registers replicas: 403 elsewhere)."""
    return not_for_engine(await any_key(request))


async def _session_key(request: Request, sessions: SessionStore) -> KeyInfo:
    session, info = await session_key(sessions, request.app.state.tg.keys,
                                      request.cookies[COOKIE])
    if request.method not in SAFE_METHODS and not session.csrf_ok(
            request.headers.get(CSRF_HEADER)):
        raise PermissionDenied("Missing or wrong X-CSRF-Token for this console session.",
                               code="csrf_failed")
    return admin_only(info)


async def admin_key(key: Annotated[KeyInfo, Depends(any_key)]) -> KeyInfo:
    """403 unless the key has the admin scope."""
    return admin_only(key)


async def replica_key(key: Annotated[KeyInfo, Depends(any_key)]) -> KeyInfo:
    """An admin or ``engine`` key (registering and deregistering replicas)."""
    return replica_only(key)


Key = Annotated[KeyInfo, Depends(current_key)]
AdminKey = Annotated[KeyInfo, Depends(admin_key)]
