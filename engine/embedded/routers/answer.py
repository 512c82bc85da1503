"""What both inference routes share: the start (the prompt prepared, the caller's trace
continued, the fields every chunk carries) and the ending (an SSE stream of chunks, or the whole
answer collected into one JSON body; 499 when the client left before it was done)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.embedded.scheduler import StepOutput
from engine.embedded.serving import OpenAIServing, Prepared, Result
from engine.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


async def begin(serving: OpenAIServing, body: ChatCompletionRequest | CompletionRequest,
                request: Request, object_: str) -> tuple[Prepared, dict[str, Any]]:
    """The prepared request and the fields every chunk of its answer carries (``object_``: the
    chunk's ``object``)."""
    p = await serving.prepare(body, request.headers.get("x-request-id"))
    serving.continue_trace(p, request.headers)
    return p, {"id": p.request_id, "object": object_, "created": p.created, "model": p.model}


async def answer(serving: OpenAIServing, p: Prepared, body: SamplingFields, request: Request, *,
                 base: dict[str, Any],
                 chunk: Callable[[StepOutput], dict[str, Any] | None],
                 first: dict[str, Any] | None,
                 whole: Callable[[Result], dict[str, Any]]) -> Response:
    """``chunk`` shapes one streamed output (None: nothing to send yet), ``first`` is sent before
    them, ``whole`` shapes the collected result."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            serving.sse_stream(p, chunk, first=first, include_usage=include_usage, base=base),
            media_type="text/event-stream")
    res = await serving.collect(p, request)
    if res is None:
        return Response(status_code=499)  # the client went away; nobody reads this
    return JSONResponse(whole(res))
