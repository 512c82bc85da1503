"""Request bodies of the vLLM OpenAI server subset the embedded engine speaks.

Unknown fields are ignored (vLLM accepts and ignores them too); fields we cannot honour with a
different meaning (``n > 1``, ``echo``) are refused with 400 rather than silently wrong.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import BadRequestError


def bad(message: str, param: str | None, value: Any = None, *, show: bool = True) -> None:
    """Raise vLLM's semantic 400: ``<message> (parameter=<param>, value=<value>)``."""
    suffix = "" if param is None else (
        f" (parameter={param}, value={value})" if show else f" (parameter={param})")
    raise BadRequestError(message + suffix, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(BaseModel):
    """Schema only (wrong types are pydantic's "Bad Request"); value ranges are checked by
    :meth:`check`, which answers vLLM's ``BadRequestError`` messages."""

    # NaN or infinite sampling values would poison a whole batch: refuse them at the door.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def check(self, max_model_len: int, max_logprobs: int) -> None:
        if self.temperature is not None and self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}.", "temperature",
                self.temperature)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}.", "top_p", self.top_p)
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens",
                self.max_tokens)
        if self.max_tokens is not None and self.max_tokens > max_model_len:
            bad(f"max_tokens={self.max_tokens} cannot be greater than max_model_len="
                f"{max_model_len}. Please request fewer output tokens.", "max_tokens",
                self.max_tokens)
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            bad("seed must fit in 64 bits.", "seed", self.seed)
        if self.n != 1:
            bad(f"n must be 1 on this engine, got {self.n}.", "n", self.n)
        if self.stream_options is not None and not self.stream:
            bad("Stream options can only be defined when `stream=True`.", "stream_options",
                show=False)
        if isinstance(self.stop, list) and any(not x for x in self.stop):
            bad("stop strings must not be empty.", "stop", self.stop)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in stops if x]


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def check(self, max_model_len: int, max_logprobs: int) -> None:
        super().check(max_model_len, max_logprobs)
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                bad("Only one prompt per request is supported on this engine.", "prompt",
                    show=False)
            p = p[0]
        if not p:
            bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt",
                show=False)
        if self.echo:
            bad("echo is not supported on this engine.", "echo", self.echo)
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            bad(f"Requested sample logprobs of {self.logprobs}, which is greater than max "
                f"allowed: {max_logprobs}", "logprobs", self.logprobs)

    def one_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text":
                    raise ValueError("only text content parts are supported")
                parts.append(str(p.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def check(self, max_model_len: int, max_logprobs: int) -> None:
        super().check(max_model_len, max_logprobs)
        if not self.messages:
            raise BadRequestError("Cannot apply chat template to an empty conversation. "
                                  "Provide at least one message.")
        if self.top_logprobs is not None and not self.logprobs:
            bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs",
                show=False)
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= max_logprobs:
            bad(f"Requested sample logprobs of {self.top_logprobs}, which is greater than max "
                f"allowed: {max_logprobs}", "top_logprobs", self.top_logprobs)
        mct = self.max_completion_tokens
        if mct is not None and (mct < 1 or mct > max_model_len):
            bad(f"max_completion_tokens={mct} must be between 1 and max_model_len="
                f"{max_model_len}.", "max_completion_tokens", mct)


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None

