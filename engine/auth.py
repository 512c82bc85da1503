"""The engine's shared secret: pure ASGI middleware that checks ``Authorization: Bearer <key>``.

It does what vLLM's ``--api-key`` does, so the gateway drives both kinds alike: every path under
``/v1`` (completions, chat, models, ``load_lora_adapter``, ``unload_lora_adapter``) needs the
key; ``/health``, ``/metrics``, ``/version`` and ``OPTIONS`` requests stay open, as in vLLM (a
health probe needs no secret and reveals nothing). A missing or wrong key is a 401 in OpenAI's
error shape, answered before the body is read. The comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from shared.errors import AuthenticationFailed


class EngineAuth:
    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        # Compare digests: constant time regardless of the given value's length.
        self._digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest()
        body = AuthenticationFailed("Invalid or missing engine API key.",
                                    code="invalid_api_key").to_dict()
        self._refusal = json.dumps(body).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or not scope.get("path", "").startswith("/v1")):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(hashlib.sha256(given).digest(), self._digest):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._refusal)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": self._refusal})
