"""One bad record costs only itself: the gateway's sampler writes a batch with one over-deep
record (real Redis, the real scrubber), and every other record of the batch arrives; scrubbing is
depth-bounded, so the deep record is kept, its deep part masked."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import redis.asyncio as aioredis

from gateway.metrics import Metrics
from gateway.scrub import DEPTH_MARK, MAX_DEPTH, scrub_text, scrub_value
from gateway.settings import GatewaySettings
from gateway.traffic_sampler import Sampler


def record(i: int, request: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": f"batch-{i}", "trace_id": None, "key_id": "key_a",
            "route": "/v1/chat/completions", "model": "base", "name": "base", "version": None,
            "lane": "base", "request": request, "output": "mail ann@example.org",
            "status": 200, "latency_ms": 1.0, "ttft_ms": None}


def nested(depth: int) -> Any:
    value: Any = "call 0044 20 7946 0958"
    for _ in range(depth):
        value = {"a": [value]}
    return value


def write_batch(redis_url: str, scrubber: str) -> list[dict[str, Any]]:
    stream = f"tunegate:test:{secrets.token_hex(4)}:traffic"

    async def run() -> list[dict[str, Any]]:
        r = aioredis.Redis.from_url(redis_url)
        settings = GatewaySettings(sample_stream=stream, sample_flush_s=0.05,
                                   sample_scrubber=scrubber)
        sampler = Sampler(settings, Metrics(), r)
        await sampler.start()
        try:
            good = {"messages": [{"role": "user", "content": "mail ann@example.org"}]}
            for i in range(10):
                # The fifth record carries a field 600 levels deep (a JSON body can).
                body = {**good, "metadata": nested(600)} if i == 4 else good
                assert sampler.submit(record(i, body))
            await sampler.stop(timeout_s=10)
            entries = await r.xrange(stream)
            return [json.loads(fields[b"r"]) for _, fields in entries]
        finally:
            await r.delete(stream)
            await r.aclose()

    return asyncio.run(run())


def test_one_deep_record_does_not_drop_its_batch(redis_url: str) -> None:
    got = write_batch(redis_url, "default")
    assert sorted(r["request_id"] for r in got) == [f"batch-{i}" for i in range(10)]
    assert all(r["output"] == "mail [email]" for r in got)
    deep = next(r for r in got if r["request_id"] == "batch-4")["request"]["metadata"]
    depth = 0
    while isinstance(deep, (dict, list)):  # masked below the bound, never kept unscrubbed
        deep = deep["a"] if isinstance(deep, dict) else deep[0]
        depth += 1
    assert deep == DEPTH_MARK and depth <= MAX_DEPTH


def test_an_unencodable_record_costs_only_itself(redis_url: str) -> None:
    # Scrubbing off: the 600-deep body reaches the encoder as it is; only it may be lost.
    got = write_batch(redis_url, "off")
    assert {f"batch-{i}" for i in range(10) if i != 4} <= {r["request_id"] for r in got}


def test_scrubbing_depth_is_bounded() -> None:
    out = scrub_value(nested(50_000), scrub_text)  # far beyond Python's recursion limit
    assert json.dumps(out).count(DEPTH_MARK) == 1  # walked MAX_DEPTH levels, not 50,000
