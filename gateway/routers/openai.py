"""The OpenAI inference surface: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``. Bodies are passed to the engine as they are, after the checks of the fields
the gateway needs or documents (model, stream, max_tokens, max_completion_tokens, n,
temperature, the messages' roles and contents, the prompt); the engine validates the rest."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.deps import Key, State, current_key
from gateway.request_body import MAX_TOKENS_FIELD, check_fields, parse_body, prompt_size
from gateway.serving import ANSWER_OR_STREAM, complete_json, json_response, open_stream, prepare
from gateway.sse import SSEResponse
from shared.errors import InvalidRequest, TunegateError
from shared.registry import BASE

router = APIRouter(tags=["openai"])

# For the OpenAPI schema (docs and the fuzz lane): the handlers read the body themselves, check
# these fields as documented here (``_check_documented`` and ``gateway.serving``), and pass the
# body on to the engine, which validates the rest.
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "maxLength": 256}, "stream": {"type": "boolean"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS_FIELD},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1,
                              "maximum": MAX_TOKENS_FIELD},
    "temperature": {"type": ["number", "null"]},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 128},
}
# Roles are the engine's (its chat template's) to accept: system, user, assistant, tool, ...
_MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"],
    "properties": {"role": {"type": "string"},
                   "content": {"type": ["string", "array", "null"]}}}}
_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
_PROMPT = {"anyOf": [{"type": "string", "minLength": 1}, _TOKENS,
                     {"type": "array", "minItems": 1, "items": {"anyOf": [
                         {"type": "string", "minLength": 1}, _TOKENS]}}]}


def _check_documented(body: dict[str, Any], field: str, value: Any) -> None:
    """400 for the documented fields the other checks leave to the engine (a fake or lenient
    engine must not make an invalid request a 200)."""
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float)):
        raise InvalidRequest("`temperature` must be a number", param="temperature")
    if field != "messages":
        return
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest("each message must be an object with a string `role`",
                                 param=f"messages.{i}")
        if not isinstance(m.get("content"), str | list | None):
            raise InvalidRequest("a message's `content` must be a string, a list of parts or "
                                 "null", param=f"messages.{i}.content")


def _doc(field: str, value: dict[str, Any]) -> dict[str, Any]:
    body = {"type": "object", "required": [field], "properties": {**_COMMON, field: value}}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": body}}},
            "responses": ANSWER_OR_STREAM}


async def _proxy(request: Request, key: Any, state: Any, route: str, field: str) -> Response:
    settings = state.settings
    body = parse_body(await request.body(), settings.max_json_depth)
    model, stream, asked = check_fields(body, field, settings.max_model_name_chars)
    value = body[field]
    if field == "messages" and (not isinstance(value, list) or not value):
        raise InvalidRequest("`messages` must be a non-empty list", param="messages")
    if field == "prompt" and (not isinstance(value, str | list) or not value):
        raise InvalidRequest("`prompt` must be a non-empty string or list", param="prompt")
    _check_documented(body, field, value)
    chars, prompts = prompt_size(value, field)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(f"the prompt is longer than {settings.max_prompt_chars} characters",
                             param=field, code="prompt_too_long")
    call = await prepare(state, request, key, route, body, model, stream, asked, prompts)
    try:
        if stream:
            events, finish = await open_stream(call)
            return SSEResponse(events, finish)
        return json_response(await complete_json(call))
    except TunegateError:
        await state.quotas.settle(call.reservation, 0)  # nothing was generated: refund tokens
        raise


# The two hot routes authenticate inside the handler instead of through ``Depends``: FastAPI's
# dependency solving is a measurable share of the gateway's per-request CPU (bench/README.md,
# gateway overhead); the checks are the same functions as everywhere else.
@router.post("/v1/chat/completions", openapi_extra=_doc("messages", _MESSAGES))
async def chat_completions(request: Request) -> Response:
    key = await current_key(request)
    return await _proxy(request, key, request.app.state.tg, "/v1/chat/completions", "messages")


@router.post("/v1/completions", openapi_extra=_doc("prompt", _PROMPT))
async def completions(request: Request) -> Response:
    key = await current_key(request)
    return await _proxy(request, key, request.app.state.tg, "/v1/completions", "prompt")


@router.get("/v1/models")
async def list_models(key: Key, state: State) -> Response:
    """``base``, and for every adapter name this key may use: ``NAME`` (when it has a ``stable``
    alias) and ``NAME:ALIAS`` for each alias, each with ``resolves_to``: the version
    (``NAME@vN``) it answers with now (bare ``NAME`` is ``stable``, apart from the share of
    requests an active canary answers). Versions are usable but not listed."""
    entries: list[dict[str, Any]] = []

    def add(model_id: str, parent: str | None, resolves_to: str | None = None) -> None:
        entries.append({"id": model_id, "object": "model", "created": 0,
                        "owned_by": "tunegate", "parent": parent,
                        **({"resolves_to": resolves_to} if resolves_to else {})})

    if key.may_use(BASE):
        add(BASE, None)
    for adapter in await to_thread.run_sync(state.registry.list_adapters):
        name, aliases = adapter["name"], adapter["aliases"]
        if not aliases or not key.may_use(name):
            continue
        if "stable" in aliases:
            add(name, BASE, f"{name}@v{aliases['stable']}")
        for alias, version in sorted(aliases.items()):
            add(f"{name}:{alias}", BASE, f"{name}@v{version}")
    return json_response({"object": "list", "data": entries})
