"""``POST /v1/generate``: the seed's contract, served as a chat completion (the model's chat
template is applied by the engine).

Request ``{prompt: 1..1024 chars, max_tokens: 1..1024 = 256, temperature: 0..2 = 0.1, model =
"base", stream = false}``; answer ``{text, tokens_generated, latency_ms, model, request_id}``.
With ``stream`` the answer is SSE: ``data: {"text": <delta>}`` events, then one final event with
the whole answer's fields (and ``"finish_reason"``), then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.deps import Key, State
from gateway.request_body import prompt_size
from gateway.serving import ANSWER_OR_STREAM, complete_json, json_response, open_stream, prepare
from gateway.sse import SSEResponse
from shared.errors import InvalidRequest, TunegateError

router = APIRouter(tags=["generate"])


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=1024)
    max_tokens: int = Field(default=256, ge=1, le=1024)
    temperature: float = Field(default=0.1, ge=0.0, le=2.0)
    model: str = Field(default="base", min_length=1, max_length=200)
    stream: bool = False


@router.post("/v1/generate", openapi_extra={
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}},
    "responses": ANSWER_OR_STREAM})
async def generate(request: Request, key: Key, state: State) -> Response:
    # Parsed here rather than as a FastAPI body parameter: any content type is accepted as JSON
    # (curl -d sends form encoding), and the body is parsed exactly once.
    try:
        req = GenerateRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"],
                             param=param) from None
    body: dict[str, Any] = {"model": req.model, "max_tokens": req.max_tokens,
                            "temperature": req.temperature, "stream": req.stream,
                            "messages": [{"role": "user", "content": req.prompt}]}
    _, prompts = prompt_size(body["messages"], "messages")
    call = await prepare(state, request, key, "/v1/chat/completions", body, req.model,
                         req.stream, req.max_tokens, prompts)
    try:
        if req.stream:
            events, finish = await open_stream(call, pass_usage=True)
            return SSEResponse(_seed_events(events, call), finish)
        data = await complete_json(call)
    except TunegateError:
        await state.quotas.settle(call.reservation, 0)
        raise
    choice = (data.get("choices") or [{}])[0]
    usage = data.get("usage") or {}
    return json_response({
        "text": (choice.get("message") or {}).get("content") or "",
        "tokens_generated": usage.get("completion_tokens", 0),
        "latency_ms": round((time.perf_counter() - call.start) * 1000, 2),
        "model": call.resolved.ref,
        "request_id": call.request_id,
    })


async def _seed_events(events: AsyncIterator[bytes], call: Any) -> AsyncIterator[bytes]:
    parts: list[str] = []
    tokens = 0
    finish_reason = None
    async for ev in events:
        line = ev.strip()
        if line == b"data: [DONE]":
            break
        try:
            data = json.loads(line[5:]) if line.startswith(b"data:") else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            continue
        if "error" in data:
            yield ev
            yield b"data: [DONE]\n\n"
            return
        for choice in data.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            finish_reason = choice.get("finish_reason") or finish_reason
            if delta:
                parts.append(delta)
                tokens += 1
                yield b"data: " + json.dumps({"text": delta}).encode() + b"\n\n"
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"]
    final = {"text": "".join(parts), "tokens_generated": tokens,
             "latency_ms": round((time.perf_counter() - call.start) * 1000, 2),
             "model": call.resolved.ref, "request_id": call.request_id,
             "finish_reason": finish_reason}
    yield b"data: " + json.dumps(final).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
