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
    SCOPE_STATE,
    Session,
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
    rstate = request.scope.setdefault("state", {})
    info = rstate.get("key")
    if info is None:
        found = await _console_session(request)
        if found is not None:
            session, info = found
            if request.method not in SAFE_METHODS and not session.csrf_ok(
                    request.headers.get(CSRF_HEADER)):
                raise PermissionDenied("Missing or wrong X-CSRF-Token for this console session.",
                                       code="csrf_failed")
            info = admin_only(info)
        else:
            digest = hash_key(bearer_secret(request.headers.get("authorization")))
            info = await request.app.state.tg.keys.authenticate(digest)
    if info is None:
        raise unknown_key()
    rstate["key_id"] = info.id
    return info  # type: ignore[no-any-return]


async def current_key(request: Request) -> KeyInfo:
    """A user or admin key (an ``engine`` key only registers replicas: 403 elsewhere)."""
    return not_for_engine(await any_key(request))


async def _console_session(request: Request) -> tuple[Session, KeyInfo] | None:
    """The console session of the request's cookie and its key, as the header guard found them
    (looked up here only where the guard did not run); None without an ``Authorization``-less
    cookie or where the console is off."""
    found = request.scope.get("state", {}).get(SCOPE_STATE)
    if found is not None:
        return found  # type: ignore[no-any-return]
    sessions = getattr(request.app.state, "console_sessions", None)
    if (request.headers.get("authorization") is not None or sessions is None
            or COOKIE not in request.cookies):
        return None
    return await session_key(sessions, request.app.state.tg.keys, request.cookies[COOKIE])


async def console_session(request: Request) -> Session | None:
    """The request's live console session (None: a Bearer caller)."""
    found = await _console_session(request)
    return found[0] if found is not None else None


async def admin_key(key: Annotated[KeyInfo, Depends(any_key)]) -> KeyInfo:
    """403 unless the key has the admin scope."""
    return admin_only(key)


async def replica_key(key: Annotated[KeyInfo, Depends(any_key)]) -> KeyInfo:
    """An admin or ``engine`` key (registering and deregistering replicas)."""
    return replica_only(key)


Key = Annotated[KeyInfo, Depends(current_key)]
AdminKey = Annotated[KeyInfo, Depends(admin_key)]
