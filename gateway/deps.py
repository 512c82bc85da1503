"""``Annotated`` dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import KeyInfo, admin_only, bearer_secret, hash_key, unknown_key
from gateway.state import GatewayState
from gateway.tracing import span as tr_span


async def get_state(request: Request) -> GatewayState:
    # async: FastAPI would run a plain function in a worker thread, on every request.
    return request.app.state.tg  # type: ignore[no-any-return]


State = Annotated[GatewayState, Depends(get_state)]


async def current_key(request: Request) -> KeyInfo:
    """The caller's key: 401 when missing, malformed, unknown or revoked."""
    state = request.app.state.tg
    if state.tracing is None:
        info = await state.keys.authenticate(hash_key(bearer_secret(
            request.headers.get("authorization"))))
    else:
        with tr_span(state.tracing, request.scope["state"], "auth") as span:
            info = await state.keys.authenticate(hash_key(bearer_secret(
                request.headers.get("authorization"))))
            span.set_attribute("tunegate.key_id", info.id if info is not None else "")
    if info is None:
        raise unknown_key()
    request.scope.setdefault("state", {})["key_id"] = info.id
    return info  # type: ignore[no-any-return]


async def admin_key(key: Annotated[KeyInfo, Depends(current_key)]) -> KeyInfo:
    """403 unless the key has the admin scope."""
    return admin_only(key)


Key = Annotated[KeyInfo, Depends(current_key)]
AdminKey = Annotated[KeyInfo, Depends(admin_key)]
