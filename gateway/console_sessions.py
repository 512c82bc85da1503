"""Console sessions: who signed in with which admin key, in SQL so that every gateway process
(and a restart) sees them.

The browser holds a random 256-bit token in an HttpOnly, SameSite=Strict cookie (never readable
by the page's scripts, never in localStorage); the database holds only its sha256. Each session
has a CSRF token that the page must send as ``X-CSRF-Token`` on every request that changes
something (``gateway.deps.any_key`` checks it); the page gets it from ``GET
/console/session``. A session ends at sign-out, after ``ttl_s``, or as soon as its key is
revoked (the session and its key are looked up once on every request, by the header guard).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete

from shared.db import ConsoleSession, Database, utcnow
from shared.errors import AuthenticationFailed

COOKIE = "tunegate_console"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# ``scope["state"][SCOPE_STATE]``: the ``(session, key)`` the header guard found for a request's
# cookie (``gateway.limits``), so that the routes' dependencies do not look it up again.
SCOPE_STATE = "console_session"


@dataclass(frozen=True)
class Session:
    key_id: str
    key_hash: str
    csrf: str
    expires_at: dt.datetime

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(self.csrf, sent)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, db: Database, ttl_s: float) -> None:
        self.db, self.ttl_s = db, ttl_s

    def create(self, key_id: str, key_hash: str) -> tuple[str, Session]:
        """A new session; returns ``(cookie token, session)``."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = ConsoleSession(
            id=_digest(token),
            key_id=key_id,
            key_hash=key_hash,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + dt.timedelta(seconds=self.ttl_s),
        )
        with self.db.session() as s:
            s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
            s.add(row)
        return token, Session(row.key_id, row.key_hash, row.csrf, row.expires_at)

    def get(self, token: str) -> Session | None:
        if not token or len(token) > 100:
            return None
        with self.db.session() as s:
            row = s.get(ConsoleSession, _digest(token))
            if row is None or row.expires_at < utcnow():
                return None
            return Session(row.key_id, row.key_hash, row.csrf, row.expires_at)

    def end(self, token: str) -> None:
        with self.db.session() as s:
            s.execute(delete(ConsoleSession).where(ConsoleSession.id == _digest(token)))


async def session_key(sessions: SessionStore, keys: Any, token: str) -> tuple[Session, Any]:
    """The live session of ``token`` and its key (``keys``: the gateway's key store); 401
    ``session_expired`` when the session ended or its key was revoked."""
    from anyio import to_thread

    session = await to_thread.run_sync(sessions.get, token)
    if session is None:
        raise AuthenticationFailed("The console session ended; sign in again.",
                                   code="session_expired")
    info = await keys.authenticate(session.key_hash)
    if info is None:
        raise AuthenticationFailed("The key of this console session was revoked.",
                                   code="session_expired")
    return session, info
