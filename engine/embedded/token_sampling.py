"""Sampling parameters and batch sampling.

Logprobs are those of the raw model distribution (before temperature and top-p), as vLLM reports
them by default, so the parity tool can compare engines on first-token logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs per token; None = none
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


def make_generator(seed: int | None) -> Any:
    import torch

    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: Any, params: list[SamplingParams], generators: list[Any]) -> list[TokenChoice]:
    """One token per row of ``logits`` ``[n, vocab]``. Greedy rows share one vectorised argmax;
    sampled rows loop (each has its own temperature, top-p and seeded generator)."""
    import torch

    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
            drop = probs.cumsum(dim=-1) - probs > p.top_p
            sorted_logits[drop] = float("-inf")
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    out = [TokenChoice(t) for t in chosen]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logprobs = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            out[i].logprob = float(logprobs[j, chosen[i]])
            k = params[i].logprobs or 0
            if k > 0:
                values, ids = logprobs[j].topk(k)
                out[i].top = list(zip(ids.tolist(), values.tolist(), strict=True))
            else:
                out[i].top = []
    return out
