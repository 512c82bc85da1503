"""``POST /v1/chat/completions`` (the model's own chat template only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.embedded.routers.answer import answer, begin
from engine.embedded.routers.deps import ServingDep
from engine.embedded.scheduler import StepOutput
from engine.embedded.serving import SYSTEM_FINGERPRINT, Result, usage
from engine.protocol import ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 serving: ServingDep) -> Response:
    p, base = await begin(serving, body, request, "chat.completion.chunk")
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}],
             "prompt_token_ids": None, "prompt_text": None}

    def chunk(out: StepOutput) -> dict[str, Any] | None:
        if not out.text and out.finish_reason is None and not body.logprobs:
            return None  # text held back (a possible stop string): nothing to say yet
        choice: dict[str, Any] = {
            "index": 0, "delta": {"content": out.text},
            "logprobs": serving.chat_logprobs(out.tokens) if body.logprobs else None,
            "finish_reason": out.finish_reason}
        if out.finish_reason is not None:
            choice["stop_reason"] = out.stop_reason
        choice["token_ids"] = None
        return {**base, "choices": [choice]}

    def whole(res: Result) -> dict[str, Any]:
        return {
            "id": p.request_id, "object": "chat.completion", "created": p.created,
            "model": p.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": res.text, "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None},
                "logprobs": serving.chat_logprobs(res.tokens) if body.logprobs else None,
                "finish_reason": res.finish_reason, "stop_reason": res.stop_reason,
                "token_ids": None,
            }],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage(res.prompt_tokens, res.completion_tokens),
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        }

    return await answer(serving, p, body, request, base=base, chunk=chunk, first=first,
                        whole=whole)
