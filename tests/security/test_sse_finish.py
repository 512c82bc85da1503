"""Point 8 (SSE): whatever the event stream raises, ``finish()`` runs, so the upstream response is
closed and the replica's in-flight count released (a non-OSError used to skip it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.sse import SSEResponse


@pytest.mark.parametrize("exc", [RuntimeError("boom"), ValueError("bad chunk"), KeyError("x"),
                                 OSError("reset")])
async def test_finish_runs_when_the_stream_raises(exc: Exception) -> None:
    finished: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def events() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        raise exc

    async def finish() -> None:
        finished.append(True)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = SSEResponse(events(), finish)
    try:
        await response({"type": "http"}, receive, send)
    except Exception as raised:  # re-raised after finish(): the server logs it
        assert raised is exc
    assert finished == [True]
    assert sent[0]["type"] == "http.response.start"


async def test_finish_runs_on_client_disconnect() -> None:
    finished: list[bool] = []

    async def events() -> AsyncIterator[bytes]:
        while True:
            yield b"data: {}\n\n"
            await asyncio.sleep(0.01)

    async def finish() -> None:
        finished.append(True)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await SSEResponse(events(), finish)({"type": "http"}, receive, send)
    assert finished == [True]
