"""The request path shared by the inference routes: resolve, authorise, reserve quota, route,
send, and return JSON or pass SSE through.

The answer's ``model`` field is the resolved immutable name (``NAME@vN``, or ``base``), like
OpenAI answering with a dated snapshot: clients see exactly which version served them.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from gateway import tracing as tr
from gateway.auth import KeyInfo
from gateway.limits import parse_json
from gateway.quotas import Reservation
from gateway.sse import SSEResponse, error_event
from gateway.state import GatewayState
from gateway.traffic_sampler import answer_text
from gateway.upstream import (
    ReplicaLost,
    ReplicaUnreachable,
    UpstreamResponse,
    error_from_response,
)
from shared.errors import InvalidRequest, PermissionDenied, TunegateError, UpstreamError
from shared.promotion import Route
from shared.registry import ResolvedModel

JSON_HEADERS = {"content-type": "application/json"}
MAX_TOKENS_FIELD = 2**31 - 1  # the most a max_tokens field may say (engines use int32)
TEMPLATE_TOKENS = 16  # tokens a chat template may add per message (role, markers), upper bound
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI/vLLM default for /v1/completions
# OpenAPI ``responses`` of the inference routes (documentation and the fuzz lane).
ANSWER_OR_STREAM = {"200": {
    "description": "The answer, or its SSE stream with `stream` (JSON events, then [DONE])",
    "content": {"application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {}}}}}


def parse_body(raw: bytes, max_depth: int = 64) -> dict[str, Any]:
    body = parse_json(raw, max_depth)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _positive(body: dict[str, Any], name: str, most: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most:
        raise InvalidRequest(f"`{name}` must be an integer between 1 and {most}", param=name)
    return v


def check_fields(body: dict[str, Any], content_field: str,
                 max_model_name_chars: int = 256) -> tuple[str, bool, int | None]:
    """Only what the gateway needs; everything else is the engine's to validate. Returns
    ``(model, stream, asked)``: ``asked`` is the most tokens per choice the engine would be
    allowed to produce (the larger of ``max_tokens`` and ``max_completion_tokens``, which
    engines read with different precedence), None when neither is set."""
    model = body.get("model", "base")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` must be a non-empty string", param="model")
    if len(model) > max_model_name_chars:
        raise InvalidRequest(f"`model` is longer than {max_model_name_chars} characters",
                             param="model", code="model_name_too_long")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    asked = [v for v in (_positive(body, "max_tokens", MAX_TOKENS_FIELD),
                         _positive(body, "max_completion_tokens", MAX_TOKENS_FIELD))
             if v is not None]
    if content_field not in body:
        raise InvalidRequest(f"`{content_field}` is required", param=content_field)
    return model, stream, max(asked) if asked else None


def _text_tokens(value: Any) -> tuple[int, int]:
    """``(characters, upper bound of tokens)`` of message content or a prompt string: tokenizers
    (byte-level BPE, SentencePiece with byte fallback) never make a token of less than one byte,
    so UTF-8 bytes bound the tokens from above."""
    if isinstance(value, str):
        return len(value), len(value) if value.isascii() else len(value.encode())
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
        chars = tokens = 0
        for part in value:
            if isinstance(part, dict):
                c, t = _text_tokens(part.get("text"))
                chars, tokens = chars + c, tokens + t
        return chars, tokens
    return 0, 0


def prompt_size(value: Any, field: str) -> tuple[int, list[int]]:
    """``(characters, [upper bound of prompt tokens per generated sequence])``. Chat: one
    sequence, the contents plus ``TEMPLATE_TOKENS`` per message for the chat template. Completions:
    a string, a list of token ids (counted as they are), or a batch of either (one each)."""
    if field == "messages":
        chars, tokens = 0, TEMPLATE_TOKENS
        for m in value:
            c, t = _text_tokens(m.get("content") if isinstance(m, dict) else None)
            chars, tokens = chars + c, tokens + t + TEMPLATE_TOKENS
        return chars, [tokens]
    if isinstance(value, str):
        c, t = _text_tokens(value)
        return c, [t + 2]
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return len(value), [len(value)]
    chars, out = 0, list[int]()
    for v in value:
        if isinstance(v, str) and v:
            c, t = _text_tokens(v)
            chars += c
            out.append(t + 2)
        elif isinstance(v, list) and v and all(
                isinstance(i, int) and not isinstance(i, bool) for i in v):
            chars += len(v)
            out.append(len(v))
        else:
            raise InvalidRequest("`prompt` must be a string, token ids, or a list of either "
                                 "(none empty)", param="prompt")
    return chars, out or [2]


def budget(body: dict[str, Any], route: str, asked: int | None, prompts: list[int],
           context: int) -> int:
    """Tokens to reserve: what the engine will at most produce, prompt included. ``asked`` over
    the context is a 400. The bound is written into the body sent upstream, so the engine cannot
    be told more than was reserved; with no bound the engine stops at its context (the whole
    context is reserved), except on /v1/completions where the protocol's default is 16."""
    if asked is not None and asked > context:
        raise InvalidRequest(f"max_tokens={asked} is more than the model's context length of "
                             f"{context} tokens", param="max_tokens")
    if asked is None and route == "/v1/completions":
        asked = COMPLETIONS_DEFAULT_MAX_TOKENS
    if asked is not None:
        body["max_tokens"] = asked
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = asked
    choices = _positive(body, "n", 128) or 1
    best_of = _positive(body, "best_of", 128) or 1
    per_prompt = max(choices, best_of)
    if asked is None:
        return len(prompts) * per_prompt * context
    return sum(min(context, p + asked) * per_prompt for p in prompts)


@dataclass
class Call:
    """One inference request on its way through the gateway."""

    state: GatewayState
    request: Request
    key: KeyInfo
    route: str  # engine path, e.g. "/v1/chat/completions"
    body: dict[str, Any]
    stream: bool
    resolved: ResolvedModel
    reservation: Reservation | None = None
    start: float = field(default_factory=time.perf_counter)
    promotion: Route | None = None  # set when this is a promotion's canary request
    # How it is served (shared.traffic_records.LANES); "" means the default for ``resolved``.
    lane: str = ""
    sample: dict[str, Any] | None = None  # the body as the client sent it, when sampled
    upstream_request_id: str | None = None  # X-Request-ID for the engine; None: request_id
    span: Any = None  # the engine call's span when tracing is on (gateway.tracing)

    def __post_init__(self) -> None:
        if not self.lane:
            self.lane = default_lane(self.resolved)

    @property
    def request_id(self) -> str:
        return str(self.request.scope["state"]["request_id"])

    @property
    def model_label(self) -> str:
        return self.state.metrics.model_label(self.resolved.name)

    @property
    def version_label(self) -> str:
        v = self.resolved.version
        return "base" if v is None else f"v{v}"

    def observe_latency(self) -> None:
        self.state.metrics.inference_latency.labels(self.model_label, self.version_label).observe(
            time.perf_counter() - self.start)


def default_lane(resolved: ResolvedModel) -> str:
    """``base``; ``pinned`` when the client named an alias or a version; else ``stable``."""
    if resolved.is_base:
        return "base"
    return "stable" if resolved.requested == resolved.name else "pinned"


async def prepare(state: GatewayState, request: Request, key: KeyInfo, route: str,
                  body: dict[str, Any], model: str, stream: bool,
                  asked: int | None, prompts: list[int]) -> Call:
    context = state.router.max_model_len() or state.settings.max_model_len
    need = budget(body, route, asked, prompts, context)
    tracing = state.tracing
    rstate = request.scope["state"]
    with tr.span(tracing, rstate, "resolve model", {"gen_ai.request.model": model}) as span:
        resolved = await state.resolver.resolve(model)
        if span is not None:
            span.set_attribute("tunegate.model.resolved", resolved.ref)
    if not key.may_use(resolved.name):
        raise PermissionDenied(f"This key may not use the model `{model}`.", param="model",
                               code="model_not_allowed")
    request.scope["state"]["model_label"] = state.metrics.model_label(resolved.name)
    promo = state.promotions
    canary = None
    if promo is not None:  # a bare NAME under promotion: maybe its canary (gateway.promotion)
        resolved, canary = promo.route(model, resolved)
    call = Call(state, request, key, route, body, stream, resolved, promotion=canary,
                lane="canary" if canary is not None else "")
    with tr.span(tracing, rstate, "quota"):
        call.reservation = await state.quotas.reserve(key, need)
    state.sampler.consider(call)
    if promo is not None and canary is None and (shadow := promo.shadow_route(model, resolved)):
        promo.mirror(call, shadow, functools.partial(send_copy, call), state.sampler.submit)
    return call


async def send_copy(live: Call, body: dict[str, Any], candidate: ResolvedModel,
                    ) -> tuple[UpstreamResponse, Callable[[], None], str]:
    """Send a shadow copy of ``live`` (``body``, to ``candidate``): never streamed, no quota, no
    sample of its own (the promotion records its answer)."""
    call = replace(live, body=body, stream=False, resolved=candidate, reservation=None,
                   start=time.perf_counter(), promotion=None, lane="shadow", sample=None,
                   # The engine sees its own id for the copy; the sample keeps the live one.
                   upstream_request_id=f"{live.request_id}-shadow", span=None)
    resp, release, sent = await send(call)
    if call.span is None:
        return resp, release, sent
    span, call.span = call.span, None

    def release_and_end() -> None:  # the copy's upstream span ends with its response
        release()
        tr.end_upstream(span, status=resp.status_code)

    return resp, release_and_end, sent


async def send(call: Call) -> tuple[UpstreamResponse, Callable[[], None], str]:
    """:func:`_send`, counting a canary's failures for the promotion's error-rate gate."""
    try:
        return await _send(call)
    except TunegateError as exc:
        if call.promotion is not None and call.state.promotions is not None:
            call.state.promotions.failed(call.promotion, "canary", exc)
        raise


async def _send(call: Call) -> tuple[UpstreamResponse, Callable[[], None], str]:
    """Send to the first replica that takes it; returns the response (unread when streaming), a
    release callback (must be called) and the model id sent upstream."""
    router = call.state.router
    tracing = call.state.tracing
    headers = {"content-type": "application/json",
               "x-request-id": call.upstream_request_id or call.request_id}
    ref = None if call.resolved.is_base else call.resolved.ref
    last: TunegateError = router.no_replica()
    for replica in router.order(ref):
        try:
            for attempt in (1, 2):
                if tracing is not None:
                    held = ref is not None and ref in replica.adapters
                    tr.choose_replica(tracing, call.request.scope["state"], replica.url,
                                      replica.in_flight,
                                      tr.replica_reason(held, ref), attempt)
                if ref is not None:
                    with tr.span(tracing, call.request.scope["state"], "adapter load",
                                 {"tunegate.replica.url": replica.url, "tunegate.adapter": ref}
                                 ) if ref not in replica.adapters else tr.NO_SPAN:
                        await router.ensure_loaded(replica, call.resolved)
                upstream_model = router.upstream_model(replica, call.resolved)
                call.body["model"] = upstream_model
                content = json.dumps(call.body).encode()
                release = router.acquire(replica, ref)
                if tracing is not None:
                    call.span = tr.start_upstream(tracing, call, replica.url)
                    tracing.inject(headers, call.span)
                try:
                    resp = await call.state.upstream.send(replica.url, call.route, content,
                                                          headers, stream=call.stream)
                except BaseException as exc:
                    release()
                    tr.end_upstream(call.span, error=exc)
                    call.span = None
                    raise
                if resp.status_code == 404 and ref is not None and attempt == 1:
                    # The engine evicted the adapter on its own (its own LRU bound): forget it
                    # and load it again, once.
                    await resp.aclose()
                    release()
                    tr.end_upstream(call.span, status=404)
                    replica.adapters.pop(ref, None)
                    continue
                break
        except (ReplicaUnreachable, ReplicaLost) as exc:
            router.unreachable(replica, exc)
            last = router.no_replica()
            continue
        except UpstreamError as exc:
            call.state.metrics.upstream_errors.labels(replica.url, type(exc).__name__).inc()
            raise
        if resp.status_code >= 400:
            try:
                raw = await resp.read()
            finally:
                await resp.aclose()
                release()
            if resp.status_code >= 500:
                call.state.metrics.upstream_errors.labels(replica.url, "status_5xx").inc()
            tr.end_upstream(call.span, status=resp.status_code)
            call.span = None
            raise error_from_response(resp.status_code, raw)
        return resp, release, upstream_model
    raise last


def count_usage(call: Call, usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    label = call.model_label
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(pt, int):
        call.state.metrics.tokens.labels(label, "in").inc(pt)
    if isinstance(ct, int):
        call.state.metrics.tokens.labels(label, "out").inc(ct)
    total = usage.get("total_tokens")
    return total if isinstance(total, int) else None


async def complete_json(call: Call) -> dict[str, Any]:
    """Non-streaming: the engine's answer, with ``model`` set to the resolved name."""
    try:
        resp, release, _ = await send(call)
        try:
            data = json.loads(await resp.read())
        except ValueError:
            raise error_from_response(502, b"engine answered with invalid JSON") from None
        finally:
            await resp.aclose()
            release()
    except TunegateError as err:
        tr.end_upstream(call.span, error=err)
        call.span = None
        if call.sample is not None:
            call.state.sampler.record(call, err.status)
        raise
    if call.span is not None:
        tr.usage(call.span, data)
        tr.end_upstream(call.span, status=200)
    if call.sample is not None:
        call.state.sampler.record(call, 200, output=answer_text(data))
    call.observe_latency()
    if isinstance(data, dict):
        data["model"] = call.resolved.ref
        await call.state.quotas.settle(call.reservation, count_usage(call, data.get("usage")))
    return data


def json_response(data: Any) -> Response:
    return Response(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
                    media_type="application/json")


async def open_stream(call: Call, *, pass_usage: bool = False,
                      ) -> tuple[AsyncIterator[bytes], Callable[[], Any]]:
    """Streaming: send with usage reporting on, and yield the engine's SSE events one by one.
    The usage-only event is dropped unless the client asked for it; ``model`` is rewritten to
    the resolved name. An upstream failure mid-stream ends with an OpenAI-shaped error event."""
    opts = call.body.get("stream_options")
    client_wants_usage = pass_usage or (isinstance(opts, dict) and bool(opts.get("include_usage")))
    call.body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                   "include_usage": True}
    try:
        resp, release, upstream_model = await send(call)
    except TunegateError as err:
        if call.sample is not None:
            call.state.sampler.record(call, err.status)
        raise
    enc = json.dumps(upstream_model).encode()
    swap = (upstream_model != call.resolved.ref)
    ours = json.dumps(call.resolved.ref).encode()
    metrics = call.state.metrics
    used: list[int | None] = [None]
    # Sampled: the events as they pass (text reassembled later), TTFT in s, the final status.
    tap: list[bytes] | None = [] if call.sample is not None else None
    outcome: list[Any] = [None, 499]

    async def events() -> AsyncIterator[bytes]:
        first = True
        buf = b""
        try:
            async for chunk in resp.iter_chunks():
                buf += chunk
                while True:
                    i = buf.find(b"\n\n")
                    if i < 0:
                        break
                    ev, buf = buf[:i + 2], buf[i + 2:]
                    if b'"usage":{' in ev or b'"usage": {' in ev:
                        data = _event_json(ev)
                        if data is not None:
                            used[0] = count_usage(call, data.get("usage"))
                            if call.span is not None:
                                tr.usage(call.span, data)
                            if not data.get("choices") and not client_wants_usage:
                                continue
                    if call.span is not None and b'"finish_reason":"' in ev:
                        tr.usage(call.span, _event_json(ev))  # finish reasons, response id
                    if swap:
                        ev = ev.replace(b'"model":' + enc, b'"model":' + ours).replace(
                            b'"model": ' + enc, b'"model": ' + ours)
                    if first and ev.startswith(b"data: {"):
                        first = False
                        outcome[0] = time.perf_counter() - call.start
                        metrics.ttft.labels(call.model_label, call.version_label).observe(
                            outcome[0])
                        if call.span is not None:
                            tr.first_token(call.span, outcome[0])
                    if tap is not None:
                        tap.append(ev)
                    yield ev
            if buf.strip():
                yield buf
            outcome[1] = 200
        except UpstreamError as err:
            metrics.upstream_errors.labels(resp.replica, "mid_stream").inc()
            outcome[1] = err.status
            yield error_event(err)
            yield b"data: [DONE]\n\n"

    async def finish() -> None:
        await resp.aclose()
        release()
        tr.end_upstream(call.span, status=outcome[1])
        if outcome[1] == 200:
            call.observe_latency()
        if tap is not None:
            call.state.sampler.record(call, outcome[1], events=tap, ttft_s=outcome[0])
        await call.state.quotas.settle(call.reservation, used[0])

    return events(), finish


def _event_json(ev: bytes) -> dict[str, Any] | None:
    line = ev.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        data = json.loads(line[5:])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def stream_response(events: AsyncIterator[bytes], finish: Callable[[], Any]) -> SSEResponse:
    return SSEResponse(events, finish)


__all__ = ["Call", "SSEResponse", "complete_json", "open_stream", "prepare", "json_response"]
