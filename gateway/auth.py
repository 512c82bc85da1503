"""API keys: creation, storage (sha256 only), lookup with a short in-memory cache, revocation.

A key is ``tg-`` + 43 URL-safe characters (256 random bits). The database keeps its sha256 hex;
lookup goes by that hash through a unique index, and the stored hash is then compared with
``hmac.compare_digest`` so the final check never leaks timing. The secret is returned once, by
``create``; nothing can show it again.

Bootstrapping: the first admin key is made with ``tunegate keys create --scope admin``, which
writes straight to the database (no gateway needed); every other key can then be made through the
admin API too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.cache import AsyncTTLCache
from shared.db import ApiKey, Database, utcnow
from shared.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied

# user: inference, files, fine-tuning, feedback on its own requests; admin: everything;
# engine: only registering and deregistering replicas (what an engine's self-registration needs).
SCOPES = ("user", "admin", "engine")
KEY_PREFIX = "tg-"
_CACHE_MAX = 10_000  # keys remembered (unknown ones too), bounded so junk keys cannot grow it


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    scope: str
    prefix: str
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    tpm: int | None
    created_at: str
    revoked_at: str | None
    key_hash: str = ""
    sample_rate: float | None = None  # None: the gateway's default; 0: never sampled
    may_label: bool | None = None  # None: admin keys only

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    @property
    def can_label(self) -> bool:
        """Whether this key's feedback becomes training data."""
        return self.is_admin if self.may_label is None else self.may_label

    def may_use(self, name: str) -> bool:
        """``name`` is ``base`` or an adapter name (aliases and versions share their name's
        permission)."""
        return self.models is None or name in self.models

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scope": self.scope, "prefix": self.prefix,
                "models": list(self.models) if self.models is not None else None,
                "rpm": self.rpm, "tpm": self.tpm, "sample_rate": self.sample_rate,
                "may_label": self.can_label, "created_at": self.created_at,
                "revoked_at": self.revoked_at}


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(id=row.id, name=row.name, scope=row.scope, prefix=row.prefix,
                   models=tuple(row.models) if row.models is not None else None,
                   rpm=row.rpm, tpm=row.tpm, created_at=row.created_at.isoformat(),
                   revoked_at=row.revoked_at.isoformat() if row.revoked_at else None,
                   key_hash=row.key_hash, sample_rate=row.sample_rate,
                   may_label=row.may_label)


class KeyStore:
    """Keys in SQL, with a per-process cache of lookups (``ttl_s`` seconds, positive and
    negative; see ``gateway.cache``). Revocation is immediate in this process and within
    ``2 * ttl_s`` in the others."""

    def __init__(self, db: Database, ttl_s: float = 2.0) -> None:
        self.db = db
        self.cache: AsyncTTLCache[KeyInfo | None] = AsyncTTLCache(ttl_s, _CACHE_MAX)

    # ---- management ------------------------------------------------------------------------
    def create(self, *, name: str, scope: str = "user", models: list[str] | None = None,
               rpm: int | None = None, tpm: int | None = None,
               secret: str | None = None,
               sample_rate: float | None = None,
               may_label: bool | None = None) -> tuple[str, KeyInfo]:
        """Make a key; returns ``(secret, info)``. ``secret`` may be given (``tunegate up`` keeps
        its local admin key in a file) but must be at least 20 characters."""
        if scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {SCOPES}", param="scope")
        if not name or len(name) > 200:
            raise InvalidRequest("name must be 1..200 characters", param="name")
        for field, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and not 1 <= v <= 10**12:  # counted as Lua doubles in Redis
                raise InvalidRequest(f"{field} must be between 1 and 10**12", param=field)
        if "\x00" in name or any("\x00" in m for m in models or ()):
            raise InvalidRequest("names may not contain NUL characters", param="name")
        _check_rate(sample_rate)
        secret = secret or new_secret()
        if len(secret) < 20:
            raise InvalidRequest("a given key must be at least 20 characters", param="key")
        row = ApiKey(id="key_" + secrets.token_hex(8), name=name, scope=scope,
                     key_hash=hash_key(secret), prefix=secret[:8], rpm=rpm, tpm=tpm,
                     models=sorted(set(models)) if models is not None else None,
                     sample_rate=sample_rate, may_label=may_label, created_at=utcnow())
        with self.db.session() as s:
            s.add(row)
        self.cache.invalidate(row.key_hash)
        return secret, _info(row)

    def list(self, include_revoked: bool = True) -> list[KeyInfo]:
        with self.db.session() as s:
            q = select(ApiKey).order_by(ApiKey.created_at)
            if not include_revoked:
                q = q.where(ApiKey.revoked_at.is_(None))
            return [_info(r) for r in s.scalars(q)]

    def get(self, key_id: str) -> KeyInfo:
        with self.db.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}", param="id")
            return _info(row)

    def set_sample_rate(self, key_id: str, sample_rate: float | None) -> KeyInfo:
        """Set the key's sampling override (0..1; 0 opts out; None goes back to the default)."""
        _check_rate(sample_rate)
        with self.db.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}", param="id")
            row.sample_rate = sample_rate
            info = _info(row)
        self.cache.invalidate(info.key_hash)
        return info

    def revoke(self, key_id: str) -> KeyInfo:
        with self.db.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}", param="id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            info = _info(row)
        self.cache.invalidate(info.key_hash)
        return info

    # ---- request path ----------------------------------------------------------------------
    def lookup(self, digest: str) -> KeyInfo | None:
        """The active key with this hash, or None (a database query; blocking)."""
        with self.db.session() as s:
            row = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
            info = _info(row) if row is not None else None
        if info is None or info.revoked_at is not None:
            return None
        # The index found the row by hash; the final comparison is constant-time regardless.
        return info if hmac.compare_digest(info.key_hash, digest) else None

    async def authenticate(self, digest: str) -> KeyInfo | None:
        """``lookup`` through the cache (the request path)."""
        return await self.cache.get(digest, lambda: self.lookup(digest))


def _check_rate(rate: float | None) -> None:
    if rate is not None and not 0.0 <= rate <= 1.0:
        raise InvalidRequest("sample_rate must be between 0 and 1", param="sample_rate")


def bearer_secret(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "Missing API key: send it as `Authorization: Bearer <key>`.", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Authorization must be `Bearer <key>`.",
                                   code="invalid_api_key")
    return token


def unknown_key() -> AuthenticationFailed:
    return AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")


def admin_only(key: KeyInfo) -> KeyInfo:
    if not key.is_admin:
        raise PermissionDenied("This endpoint needs an admin key.", code="insufficient_scope")
    return key


def not_for_engine(key: KeyInfo) -> KeyInfo:
    if key.scope == "engine":
        raise PermissionDenied("An engine key may only register and deregister replicas.",
                               code="insufficient_scope")
    return key


def replica_only(key: KeyInfo) -> KeyInfo:
    if key.scope not in ("admin", "engine"):
        raise PermissionDenied("This endpoint needs an admin or engine key.",
                               code="insufficient_scope")
    return key
