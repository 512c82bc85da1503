"""Load-generator helpers for benchmarks of servers that speak vLLM's OpenAI protocol.

The load generator runs in the benchmark's own process (httpx async streaming, one connection per
stream); servers run as subprocesses started here. Token counts always come from the servers'
``usage`` (``stream_options.include_usage``), never from counting SSE chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class Shot:
    """One streamed request: seconds to the first text, seconds in all, completion tokens."""

    ttft_s: float
    total_s: float
    tokens: int

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first one per second after the first one (0 when undefined)."""
        span = self.total_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


@dataclass(frozen=True)
class LoadResult:
    shots: list[Shot]
    wall_s: float

    @property
    def output_tok_s(self) -> float:
        """All completion tokens over the wall time of the whole run (tokens/s)."""
        return sum(s.tokens for s in self.shots) / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return percentile([s.ttft_s * 1000 for s in self.shots], q)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100] (p95 of 12 samples is the largest)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


async def stream_completion(
    client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int,
    *, ignore_eos: bool = True,
) -> Shot:
    """POST a streamed greedy /v1/completions request and time it."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:500]
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: error mid-stream: {chunk['error']}")
            # The first chunk with text: vLLM may send "" while it holds back a possible stop.
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    total = time.perf_counter() - start
    return Shot(ttft if ttft is not None else total, total, tokens)


async def run_load(
    base_url: str, jobs: Sequence[tuple[str, str]], *, streams: int, max_tokens: int,
    ignore_eos: bool = True, timeout_s: float = 600.0,
) -> LoadResult:
    """Run ``jobs`` (model, prompt) over ``streams`` concurrent streams, in order; each stream
    takes the next job when its previous request ends (closed loop)."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    shots: list[Shot] = []
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    model, prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                shots.append(await stream_completion(client, base_url, model, prompt,
                                                     max_tokens, ignore_eos=ignore_eos))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - start
    return LoadResult(shots, wall)


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (Linux /proc)."""
    total_kib = 0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
    return total_kib / 1024




def make_lora_adapters(model_dir: Path, out_dir: Path, n: int, *, rank: int = 8,
                       targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                       std: float = 0.02) -> list[Path]:
    """``n`` peft LoRA adapters for ``model_dir`` with random, non-zero B (so each changes the
    output), saved with ``save_pretrained`` under ``out_dir/lora{i}``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=std)
        path = out_dir / f"lora{i}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
        model = peft_model.unload()  # back to the plain base for the next adapter
    return paths


def load_adapters(base_url: str, adapters: dict[str, Path]) -> None:
    for name, path in adapters.items():
        r = httpx.post(base_url + "/v1/load_lora_adapter",
                       json={"lora_name": name, "lora_path": str(path)}, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"loading {name}: HTTP {r.status_code}: {r.text[:300]}")


async def mixed_quota_request(client: httpx.AsyncClient, base: str, headers: dict[str, str],
                              rng: Any, most: int = 400) -> tuple[int, int]:
    """One request of a random kind for a token-quota load, the kinds a quota must not be
    bypassed by: ``max_tokens=1`` beside a larger ``max_completion_tokens``, either alone,
    neither (the engine may run to its context), or a token-id prompt on ``/v1/completions``;
    streamed or not. ``most``: the largest token limit asked (prompts scale with it). Returns
    (status, tokens served as the answer's usage says)."""
    kind = rng.randrange(5)
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"model": "base", "stream": stream}
    path = "/v1/chat/completions"
    if kind == 0:
        body.update(max_tokens=1, max_completion_tokens=rng.randrange(50, most))
    elif kind == 1:
        body.update(max_tokens=rng.randrange(50, most))
    elif kind == 3:
        body.update(max_completion_tokens=rng.randrange(50, most))
    if kind == 4:
        path = "/v1/completions"
        body["prompt"] = [rng.randrange(1000) for _ in range(rng.randrange(1, most * 3 // 4))]
        if rng.random() < 0.5:
            body["max_tokens"] = rng.randrange(1, most * 3 // 4)
    else:
        body["messages"] = [{"role": "user", "content": "é" * rng.randrange(1, most // 2)}]
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", base + path, headers=headers, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0
        if not stream:
            return 200, int(json.loads(await r.aread())["usage"]["total_tokens"])
        served = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    served = int(usage["total_tokens"])
        return 200, served
