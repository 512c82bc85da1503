"""``POST /v1/completions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.embedded.routers.answer import answer, begin
from engine.embedded.routers.deps import ServingDep
from engine.embedded.scheduler import StepOutput
from engine.embedded.serving import SYSTEM_FINGERPRINT, Result, usage
from engine.protocol import CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request,
                            serving: ServingDep) -> Response:
    p, base = await begin(serving, body, request, "text_completion")
    want_logprobs = body.logprobs is not None
    offset = 0

    def chunk(out: StepOutput) -> dict[str, Any] | None:
        # One chunk per token, "" while text is held back (as vLLM does).
        nonlocal offset
        logprobs = None
        if want_logprobs:
            logprobs = serving.completion_logprobs(out.tokens, offset)
        offset += len(out.text)
        return {**base, "choices": [{
            "index": 0, "text": out.text, "logprobs": logprobs,
            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
            "prompt_token_ids": None, "token_ids": None}]}

    def whole(res: Result) -> dict[str, Any]:
        return {
            **base,
            "choices": [{
                "index": 0, "text": res.text,
                "logprobs": serving.completion_logprobs(res.tokens, 0) if want_logprobs else None,
                "finish_reason": res.finish_reason, "stop_reason": res.stop_reason,
                "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
            }],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage(res.prompt_tokens, res.completion_tokens),
        }

    return await answer(serving, p, body, request, base=base, chunk=chunk, first=None,
                        whole=whole)
