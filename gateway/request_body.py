"""What the gateway reads of an inference request's body before sending it on: the JSON object,
the few fields it needs (model, stream, the token bound), an upper bound of the prompt's tokens
without a tokenizer, and the tokens to reserve for the quota. Everything else in the body is the
engine's to validate."""

from __future__ import annotations

from typing import Any

from gateway.limits import parse_json
from shared.errors import InvalidRequest

MAX_TOKENS_FIELD = 2**31 - 1  # the most a max_tokens field may say (engines use int32)
TEMPLATE_TOKENS = 16  # tokens a chat template may add per message (role, markers), upper bound
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI/vLLM default for /v1/completions

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
