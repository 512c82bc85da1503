"""The OpenAI serving logic shared by ``/v1/completions`` and ``/v1/chat/completions``: resolve the
model, tokenize and check the context, run the request on the engine, and shape the answer (a
JSON body, or SSE chunks ending with ``data: [DONE]``) the way vLLM's OpenAI server does."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from engine.embedded.async_engine import AsyncEngine
from engine.embedded.scheduler import StepOutput
from engine.embedded.token_sampling import SamplingParams, TokenChoice
from engine.errors import BadRequestError, ModelDoesNotExist
from engine.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from shared.errors import TunegateError

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
LOGPROB_FLOOR = -9999.0  # vLLM clips -inf logprobs to this so the JSON stays valid
SYSTEM_FINGERPRINT = "tunegate-embedded"


def sampling_params(req: SamplingFields, *, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    """The engine's sampling parameters for a request (vLLM's defaults where a field is unset)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )


@dataclass
class Prepared:
    request_id: str
    created: int
    model: str  # as the client named it
    adapter_key: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    trace: Any = None  # the caller's trace context (engine.tracing)


@dataclass
class Result:
    text: str = ""
    tokens: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def usage(prompt: int, completion: int, *, details: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                           "completion_tokens": completion}
    if details:
        out.update(prompt_tokens_details=None, completion_tokens_details=None)
    return out


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, *, model_name: str,
                 max_model_len: int, max_logprobs: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self._token_chars: int | None = None  # the longest vocabulary entry, characters
        self._limiter: Any = None  # one tokenization at a time, off the event loop

    async def prepare(self, req: CompletionRequest | ChatCompletionRequest,
                      request_id: str | None) -> Prepared:
        """``prepare_chat`` or ``prepare_completion`` in a worker thread: tokenizing a long
        prompt takes seconds of CPU, and the event loop must keep answering (``/health``, other
        streams) meanwhile. One at a time: a fast tokenizer is not safe to share across threads
        while it runs."""
        from anyio import CapacityLimiter, to_thread

        if self._limiter is None:
            self._limiter = CapacityLimiter(1)
        if isinstance(req, ChatCompletionRequest):
            return await to_thread.run_sync(self.prepare_chat, req, request_id,
                                            limiter=self._limiter)
        return await to_thread.run_sync(self.prepare_completion, req, request_id,
                                        limiter=self._limiter)

    def _check_chars(self, chars: int) -> None:
        """Refuse, before tokenizing, a prompt that cannot fit the context: no token covers more
        characters than the longest vocabulary entry, so more than ``max_model_len`` times that
        many characters is more than ``max_model_len`` tokens."""
        if self._token_chars is None:
            vocab = getattr(self.tokenizer, "get_vocab", None)
            self._token_chars = max((len(t) for t in vocab()), default=0) if vocab else 0
        if self._token_chars and chars > self.max_model_len * self._token_chars:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {chars} characters, more than that many tokens can hold. "
                "Please reduce the length of the input prompt.", param="input_tokens")

    # -- preparing a request -------------------------------------------------------------------

    def resolve_model(self, model: str | None) -> str | None:
        """The adapter key for ``model`` (None for the base model)."""
        if model is None or model == self.model_name:
            return None
        key = self.engine.adapter_key(model)
        if key is None:
            raise ModelDoesNotExist(model, [self.model_name])
        return key

    def _max_tokens(self, asked: int | None, n_prompt: int) -> int:
        """Tokens to generate: as asked, clamped to the room left in the context (vLLM clamps
        rather than refusing); a prompt that leaves no room is a 400."""
        if n_prompt >= self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt contains at least {n_prompt} input tokens, which exceeds this limit"
                " even without any output tokens. Please reduce the length of the input prompt."
                f" (parameter=input_tokens, value={n_prompt})", param="input_tokens")
        room = self.max_model_len - n_prompt
        return room if asked is None else min(asked, room)

    def prepare_completion(self, req: CompletionRequest, request_id: str | None) -> Prepared:
        req.check(self.max_model_len, self.max_logprobs)
        key = self.resolve_model(req.model)
        prompt = req.one_prompt()
        if isinstance(prompt, str):
            self._check_chars(len(prompt))
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            if any(t < 0 or t >= len(self.tokenizer) for t in ids):
                raise BadRequestError("prompt holds token ids outside the vocabulary",
                                      param="prompt")
        max_tokens = self._max_tokens(req.max_tokens, len(ids))
        return Prepared(f"cmpl-{request_id or uuid.uuid4().hex[:16]}", int(time.time()),
                        req.model or self.model_name, key, ids,
                        sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs))

    def prepare_chat(self, req: ChatCompletionRequest, request_id: str | None) -> Prepared:
        req.check(self.max_model_len, self.max_logprobs)
        key = self.resolve_model(req.model)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise BadRequestError(f"Cannot apply the chat template: {exc}",
                                  param="messages") from exc
        self._check_chars(sum(len(m["content"]) for m in messages))
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequestError(f"Cannot apply the chat template: {exc}",
                                  param="messages") from exc
        except Exception as exc:  # jinja errors (raise_exception in templates) are not ValueError
            raise BadRequestError(f"Cannot apply the chat template: {exc}",
                                  param="messages") from exc
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = self._max_tokens(asked, len(ids))
        return Prepared(f"chatcmpl-{request_id or uuid.uuid4().hex[:16]}", int(time.time()),
                        req.model or self.model_name, key, ids,
                        sampling_params(req, max_tokens=max_tokens, logprobs=logprobs))

    # -- running -------------------------------------------------------------------------------

    def stream(self, p: Prepared) -> AsyncIterator[StepOutput]:
        return self.engine.generate(p.request_id, p.prompt_ids, p.params, p.adapter_key,
                                    arrival=p.arrival, trace=p.trace)

    def continue_trace(self, p: Prepared, headers: Any) -> None:
        """Trace ``p`` as part of its caller's trace, when tracing is on and it sent one."""
        if self.engine.tracing is not None:
            p.trace = self.engine.tracing.context(headers)

    async def collect(self, p: Prepared, request: Request) -> Result | None:
        """Run to the end; None when the client went away (the request is then aborted)."""

        async def consume() -> Result:
            res = Result()
            async for out in self.stream(p):
                res.text += out.text
                res.tokens.extend(out.tokens)
                res.finish_reason, res.stop_reason = out.finish_reason, out.stop_reason
                res.prompt_tokens, res.completion_tokens = out.prompt_tokens, out.completion_tokens
            return res

        task = asyncio.create_task(consume())
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None

    # -- logprobs ------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def completion_logprobs(self, tokens: list[TokenChoice], offset: int) -> dict[str, Any]:
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        return {
            "text_offset": offsets,
            "token_logprobs": [max(t.logprob or 0.0, LOGPROB_FLOOR) for t in tokens],
            "tokens": texts,
            # vLLM lists the sampled token first, then the top k (without repeating it).
            "top_logprobs": [
                {self.token_text(i): max(lp, LOGPROB_FLOOR)
                 for i, lp in [(t.token_id, t.logprob or 0.0), *(t.top or [])]}
                for t in tokens
            ],
        }

    def chat_logprobs(self, tokens: list[TokenChoice]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": max(lp, LOGPROB_FLOOR),
                    "bytes": list(text.encode("utf-8"))}

        return {"content": [
            {**entry(t.token_id, t.logprob or 0.0),
             "top_logprobs": [entry(i, lp) for i, lp in (t.top or [])]}
            for t in tokens
        ]}

    # -- SSE -----------------------------------------------------------------------------------

    async def sse_stream(self, p: Prepared, chunk: Callable[[StepOutput], dict[str, Any] | None],
                         *, first: dict[str, Any] | None, include_usage: bool,
                         base: dict[str, Any]) -> AsyncIterator[str]:
        """SSE events: ``first`` (if any), one chunk per engine output that has something to
        say, the usage chunk when asked, then ``[DONE]``; the system fingerprint rides on the
        last chunk, as in vLLM. An error midway is sent as an event in the error shape."""
        if first is not None:
            yield sse(first)
        last: StepOutput | None = None
        try:
            async for out in self.stream(p):
                last = out
                payload = chunk(out)
                if payload is None:
                    continue
                if out.finish_reason is not None and not include_usage:
                    payload["system_fingerprint"] = SYSTEM_FINGERPRINT
                yield sse(payload)
        except TunegateError as exc:
            yield sse(exc.to_dict())
        if include_usage and last is not None:
            yield sse({**base, "choices": [],
                       "usage": usage(last.prompt_tokens, last.completion_tokens, details=False),
                       "system_fingerprint": SYSTEM_FINGERPRINT})
        yield "data: [DONE]\n\n"
