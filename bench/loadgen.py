"""The load generator of ``bench/gateway_overhead.py``, in its own process: ``--clients``
keep-alive connections (raw asyncio streams on uvloop) sending the same chat request to ``--url``
for ``--seconds``, back to back or paced to an aggregate ``--rate``; prints one JSON line of
latency percentiles (to the whole body, or to the first SSE event with ``--stream``). With
``--interleave URL,URL,...``: ``--requests`` requests one at a time, in turn to each URL, and
each URL's percentiles (the low-noise comparison of gateway variants).

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --key tg-... --rate 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any


def _body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "max_tokens": 16, "stream": stream,
                       "messages": [{"role": "user", "content": "Say hi"}]})


def _request(host: str, port: int, key: str, stream: bool, model: str) -> bytes:
    body = _body(model, stream)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode()


async def _read_response(r: asyncio.StreamReader, t0: float) -> float:
    """Reads one response; returns seconds to the first body byte of an SSE event (streaming)
    or to the whole body (otherwise)."""
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:200].decode(errors="replace"))
    lower = head.lower()
    if b"transfer-encoding: chunked" not in lower:
        i = lower.index(b"content-length:")
        n = int(lower[i + 15:lower.index(b"\r\n", i)])
        await r.readexactly(n)
        return time.perf_counter() - t0
    first = None
    while True:
        size = int((await r.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await r.readuntil(b"\r\n")
            break
        data = await r.readexactly(size + 2)
        if first is None and b"data:" in data:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


async def _client(host: str, port: int, req: bytes, stop_at: float, interval: float | None,
                  lat: list[float], errors: list[str]) -> None:
    r, w = await asyncio.open_connection(host, port)
    next_t = time.perf_counter() + (random.random() * interval if interval else 0.0)
    try:
        while True:
            if interval:
                delay = next_t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_t += interval
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            w.write(req)
            try:
                lat.append(await _read_response(r, t0))
            except (RuntimeError, asyncio.IncompleteReadError, ConnectionError) as exc:
                errors.append(str(exc)[:200])
                return
    finally:
        w.close()


async def _loadgen(url: str, key: str, clients: int, seconds: float, rate: float | None,
                   stream: bool, warmup_s: float, model: str) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    req = _request(host, int(port), key, stream, model)
    interval = clients / rate if rate else None
    warm: list[float] = []
    if warmup_s:
        await asyncio.gather(*(_client(host, int(port), req, time.perf_counter() + warmup_s,
                                       interval, warm, []) for _ in range(clients)))
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, int(port), req, start + seconds, interval, lat, errors)
                           for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else -1.0

    return {"requests": len(lat), "warmup_requests": len(warm), "seconds": round(elapsed, 3),
            "rps": round(len(lat) / elapsed, 1), "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "errors": len(errors), "first_error": errors[:1]}


async def _interleaved(urls: list[str], key: str, requests: int, model: str) -> dict[str, Any]:
    """One request at a time, in turn to each of ``urls`` (one keep-alive connection each), so
    every gateway sees the same moments of the machine: drift and other people's load fall on
    all of them alike. Returns each URL's request count, p50 and p90 (ms), after 50 rounds of
    warm-up."""
    conns = []
    for url in urls:
        host, port = url.removeprefix("http://").split(":")
        r, w = await asyncio.open_connection(host, int(port))
        conns.append((r, w, _request(host, int(port), key, False, model)))
    lat: list[list[float]] = [[] for _ in urls]
    try:
        for i in range(requests + 50 * len(urls)):  # the first 50 rounds warm up
            k = i % len(urls)
            r, w, req = conns[k]
            t0 = time.perf_counter()
            w.write(req)
            took = await _read_response(r, t0)
            if i >= 50 * len(urls):
                lat[k].append(took)
    finally:
        for _, w, _ in conns:
            w.close()
    out = {}
    for url, xs in zip(urls, lat, strict=True):
        xs.sort()
        out[url] = {"requests": len(xs), "p50_ms": round(xs[len(xs) // 2] * 1000, 4),
                    "p90_ms": round(xs[int(0.9 * len(xs))] * 1000, 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", default="none")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--model", default="base")
    ap.add_argument("--interleave", default="",
                    help="comma-separated URLs: --requests sequential requests, in turn to each")
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args(argv)
    import uvloop

    if a.interleave:
        print(json.dumps(uvloop.run(_interleaved(a.interleave.split(","), a.key, a.requests,
                                                 a.model))))
        return

    res = uvloop.run(_loadgen(a.url, a.key, a.clients, a.seconds, a.rate or None, a.stream,
                              a.warmup, a.model))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
