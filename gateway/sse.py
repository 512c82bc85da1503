"""Server-sent events passed through unbuffered, with the upstream aborted on client disconnect.

``SSEResponse`` sends each event as its own ASGI body message as soon as it arrives, with the
anti-buffering headers (``Cache-Control: no-cache``, ``X-Accel-Buffering: no``). It listens for
``http.disconnect`` concurrently: when the client goes away the event iterator is closed at once
(not at the next event), and ``finish`` closes the upstream response, which aborts the engine's
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from shared.errors import TunegateError

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def error_event(err: TunegateError) -> bytes:
    return b"data: " + json.dumps(err.to_dict()).encode() + b"\n\n"


class SSEResponse(Response):
    def __init__(self, events: AsyncIterator[bytes], finish: Callable[[], Any]) -> None:
        # Deliberately not Response.__init__: there is no body to render.
        self.events = events
        self.finish = finish
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for ev in self.events:
                await send({"type": "http.response.body", "body": ev, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                for t in (pump_task, watch_task):
                    if not t.done():
                        t.cancel()
                for t in (pump_task, watch_task):
                    # Anything else the stream raised (a bug, a decoding error) is re-raised
                    # below, after finish(): the upstream and the in-flight count are released
                    # whatever went wrong.
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await t
            finally:
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self.finish()
