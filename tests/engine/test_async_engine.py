"""The asyncio bridge over the engine thread, with the fake runner of the scheduler tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine.embedded.async_engine import AsyncEngine
from engine.embedded.token_sampling import SamplingParams
from engine.errors import EngineInternalError
from tests.engine.test_scheduler import FakeRunner, detok, expected


class FlakyRunner(FakeRunner):
    """Fails the forward of any batch that holds the poisoned prompt token."""

    def prefill(self, rows):  # type: ignore[no-untyped-def]
        if any(666 in ids for _, ids, _ in rows):
            raise RuntimeError("boom")
        return super().prefill(rows)


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    eng = AsyncEngine(FlakyRunner(4), max_num_seqs=4, max_model_len=1000, max_loras=2,
                      max_lora_rank=8, base_names=["m"], decode=detok)
    eng.start()
    yield eng
    await asyncio.to_thread(eng.stop)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


async def tokens(eng: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    return [t.token_id async for out in eng.generate(rid, prompt, greedy(n))
            for t in out.tokens]


async def test_concurrent_requests_stream_their_own_tokens(engine: AsyncEngine) -> None:
    prompts = {f"r{i}": [i + 1, i + 2] for i in range(6)}
    results = await asyncio.gather(*(tokens(engine, rid, p, 5 + i)
                                     for i, (rid, p) in enumerate(prompts.items())))
    for i, (got, prompt) in enumerate(zip(results, prompts.values(), strict=True)):
        assert got == expected(prompt, 5 + i)


async def test_a_failed_forward_fails_its_requests_not_the_engine(engine: AsyncEngine) -> None:
    with pytest.raises(EngineInternalError):
        await tokens(engine, "bad", [1, 666], 3)
    assert await tokens(engine, "good", [1, 2], 3) == expected([1, 2], 3)


async def test_leaving_early_aborts(engine: AsyncEngine) -> None:
    gen = engine.generate("long", [5], greedy(10_000))
    async for _ in gen:
        break
    await gen.aclose()
    for _ in range(100):
        if not engine.scheduler.has_work():
            break
        await asyncio.sleep(0.02)
    assert not engine.scheduler.has_work()
    assert len(engine.runner.kv[0]) < 5_000  # stopped long before its 10 000 tokens
