"""Abuse bench: the gateway and the embedded engine tried as an attacker would, as figures.

    .venv/bin/python bench/abuse.py                 # ~5 minutes on 2 busy cores
    .venv/bin/python bench/abuse.py --fuzz-examples 60 --skip engine

Writes ``bench/results/security.json``:

- ``fuzz_operations``, ``fuzz_cases``, ``fuzz_server_errors``, ``fuzz_schema_violations``: the
  fuzz lane (``tests/security/fuzz_lane.py``, schemathesis) against one gateway process in front
  of the fake replica, with a user key and an admin key (valid inputs; invalid ones too, fewer);
  ``fuzz_bad_rejections``: 4xx answers outside OpenAI's error shape and invalid inputs accepted.
- ``anon_body_peak_rss_growth_mib``: peak RSS of the gateway process over its idle RSS while two
  anonymous 60 MB JSON bodies are sent to ``/admin/keys`` at once (sampled every 5 ms).
- ``upload_peak_rss_growth_mib``: peak RSS of the gateway process over its idle RSS while one
  ``--upload-mib`` MiB training file (distinct ~1 KiB records) is uploaded (chunked) and
  validated; it streams into the local artifact store (``upload_mib``, ``upload_records``,
  ``upload_status``, ``upload_seconds``). Validation keeps a 64-bit digest per record for the
  duplicate check, so the growth scales with records, not bytes.
- ``quota_overrun_tokens``: 50 concurrent clients over 2 gateway processes (streaming or not,
  ``max_tokens`` or ``max_completion_tokens`` or neither, token-id prompts), three keys with
  ``tpm`` limits, inside one quota window; tokens served (the replica reports usage as an engine
  running to its limit) beyond each key's ``tpm``, summed.
- ``feedback_cross_key_accepted``: feedback a second key sends for a request of the first (by the
  shared client ``X-Request-ID`` and by the victim's gateway request id) that is accepted (2xx).
- ``engine_health_p99_ms_under_abuse``: p99 latency of the embedded engine's ``/health`` (SmolLM2,
  polled every 20 ms) while a 12 MB prompt, a 3 MB model name, 5000-deep JSON and
  ``max_tokens=10**9`` requests arrive.
- ``unauthenticated_engine_status``: the status of a completion sent to an engine started with a
  shared secret (``TUNEGATE_ENGINE_API_KEY``), without it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import mixed_quota_request  # noqa: E402
from shared.settings import StorageSettings  # noqa: E402
from tests.gateway.conftest import Records, auth, gateway  # noqa: E402
from tests.procs import free_port, redis_server, run_server  # noqa: E402
from tests.security.conftest import full_usage_replica  # noqa: E402
from tests.security.fuzz_lane import fuzz  # noqa: E402

OUT = ROOT / "bench" / "results" / "security.json"
MIB = 2**20


# ---- fuzz ----------------------------------------------------------------------------------------
def run_fuzz(engine: str, redis_url: str, examples: int, negative_examples: int) -> dict[str, Any]:
    from schemathesis import GenerationMode

    data = Path(tempfile.mkdtemp(prefix="abuse-fuzz-"))
    records = Records(data)
    keys = {"user": records.key("user"), "admin": records.key("admin")}
    with gateway(data, [engine], redis_url) as gw:
        t0 = time.perf_counter()
        pos = fuzz(gw, keys, max_examples=examples, modes=(GenerationMode.POSITIVE,))
        neg = fuzz(gw, keys, max_examples=negative_examples, modes=(GenerationMode.NEGATIVE,))
        seconds = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for rep in (pos, neg):
        for code, n in rep.statuses.items():
            statuses[str(code)] = statuses.get(str(code), 0) + n
    return {"fuzz_operations": pos.operations, "fuzz_cases": pos.cases + neg.cases,
            "fuzz_cases_invalid_inputs": neg.cases,
            "fuzz_server_errors": pos.server_errors + neg.server_errors,
            "fuzz_schema_violations": pos.schema_violations + neg.schema_violations,
            "fuzz_bad_rejections": pos.bad_rejections + neg.bad_rejections,
            "fuzz_statuses": dict(sorted(statuses.items())), "fuzz_seconds": round(seconds, 1),
            "fuzz_failures": (pos.failures + neg.failures)[:10]}


# ---- anonymous bodies ----------------------------------------------------------------------------
def _send_anonymous(base: str, size: int) -> int:
    host, port = base.removeprefix("http://").split(":")
    status = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /admin/keys HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b'{"name": "' + b"x" * (MIB - 10)
        sent = 0
        with contextlib.suppress(OSError):
            while sent < size:
                piece = chunk[:size - sent]
                s.sendall(piece)
                sent += len(piece)
        with contextlib.suppress(OSError):
            head = s.recv(4096)
            status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return status


def _listener(port: int) -> psutil.Process:
    """The process listening on ``port`` (the uvicorn gateway)."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    return proc
    raise RuntimeError(f"no process listens on {port}")


@contextlib.contextmanager
def peak_rss(gw: str) -> Iterator[dict[str, int]]:
    """``{"idle": ..., "peak": ...}``: the gateway process's RSS before, and at most while, the
    block runs (sampled every 5 ms), bytes."""
    port = int(gw.rsplit(":", 1)[1])
    proc = _listener(port)
    found = {"idle": proc.memory_info().rss, "peak": proc.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            found["peak"] = max(found["peak"], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield found
        time.sleep(0.2)
    finally:
        stop.set()
        sampler.join()


def run_anon_bodies(engine: str) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="abuse-anon-"))
    Records(data)
    with gateway(data, [engine]) as gw, peak_rss(gw) as rss:
        statuses: list[int] = []
        senders = [threading.Thread(target=lambda: statuses.append(_send_anonymous(gw, 60 * MIB)))
                   for _ in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
    return {"anon_body_peak_rss_growth_mib": round((rss["peak"] - rss["idle"]) / MIB, 2),
            "anon_body_idle_rss_mib": round(rss["idle"] / MIB, 1), "anon_body_statuses": statuses}


# ---- a large upload ------------------------------------------------------------------------------
def run_upload(engine: str, mib: int) -> dict[str, Any]:
    """One ``mib`` MiB training file (valid JSONL) uploaded by an admin key, streamed into the
    local artifact store: the gateway's peak RSS growth while it arrives and is validated."""
    data = Path(tempfile.mkdtemp(prefix="abuse-upload-"))
    admin = Records(data).key("admin")
    records = 0

    def piece() -> bytes:  # 1 MiB of distinct ~1 KiB records (duplicates would be refused)
        nonlocal records
        out = bytearray()
        while len(out) < MIB - 1100:
            records += 1
            out += (json.dumps({"messages": [
                {"role": "user", "content": f"question {records}: " + "q" * 500},
                {"role": "assistant", "content": f"answer {records}: " + "a" * 450}]})
                + "\n").encode()
        return bytes(out)

    sent = 0
    boundary = "abuse-b0undary"

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
               f'fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
               f'filename="big.jsonl"\r\n\r\n').encode()
        for _ in range(mib):
            block = piece()
            sent += len(block)
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    with gateway(data, [engine]) as gw, peak_rss(gw) as rss:
        t0 = time.perf_counter()
        r = httpx.post(gw + "/v1/files", content=body(), timeout=600, headers={
            **auth(admin), "Content-Type": f"multipart/form-data; boundary={boundary}"})
        seconds = time.perf_counter() - t0
    return {"upload_peak_rss_growth_mib": round((rss["peak"] - rss["idle"]) / MIB, 2),
            "upload_mib": round(sent / MIB, 1), "upload_records": records,
            "upload_status": r.status_code, "upload_seconds": round(seconds, 1)}


# ---- quota overrun -------------------------------------------------------------------------------
def run_quota(engine: str, redis_url: str, seconds: float) -> dict[str, Any]:
    import redis

    data = Path(tempfile.mkdtemp(prefix="abuse-quota-"))
    records = Records(data)
    limits = [3000, 10_000, 40_000]
    keys = [records.key("user", tpm=t) for t in limits]
    with gateway(data, [engine], redis_url) as g1, gateway(data, [engine], redis_url) as g2:
        r = redis.Redis.from_url(redis_url)
        now = r.time()[0] % 60  # type: ignore[index]
        r.close()
        if now > 2:  # start at the beginning of a window; the run stays inside it
            time.sleep(60 - now + 0.5)

        async def load() -> list[tuple[int, int, int]]:
            out: list[tuple[int, int, int]] = []
            deadline = time.monotonic() + seconds
            async with httpx.AsyncClient(timeout=30,
                                         limits=httpx.Limits(max_connections=60)) as client:
                async def worker(i: int) -> None:
                    rng = random.Random(i)
                    j = 0
                    while time.monotonic() < deadline:
                        k = (i + j) % len(keys)
                        status, tokens = await mixed_quota_request(
                            client, (g1, g2)[j % 2], auth(keys[k]), rng)
                        out.append((k, status, tokens))
                        j += 1

                await asyncio.gather(*(worker(i) for i in range(50)))
            return out

        results = asyncio.run(load())
    served = [sum(t for k, s, t in results if k == i and s == 200) for i in range(len(keys))]
    codes: dict[str, int] = {}
    for _, s, _ in results:
        codes[str(s)] = codes.get(str(s), 0) + 1
    return {"quota_overrun_tokens": sum(max(0, s - t) for s, t in zip(served, limits, strict=True)),
            "quota_tpm": limits, "quota_served_tokens": served, "quota_requests": len(results),
            "quota_statuses": codes, "quota_seconds": seconds}


# ---- feedback across keys ------------------------------------------------------------------------
def run_feedback(engine: str, redis_url: str) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="abuse-feedback-"))
    records = Records(data)
    victim = records.key("user", sample_rate=1.0)
    attacker = records.key("user", sample_rate=1.0)
    accepted = tried = 0
    with gateway(data, [engine], redis_url) as gw:
        for trial in range(5):
            shared = f"order-{trial}-shared"
            ids = {shared}
            for key in (victim, attacker):
                r = httpx.post(gw + "/v1/chat/completions", timeout=30,
                               headers={**auth(key), "X-Request-ID": shared},
                               json={"model": "base", "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "hi"}]})
                r.raise_for_status()
                if key is victim and r.headers.get("x-tunegate-request-id"):
                    ids.add(r.headers["x-tunegate-request-id"])
            time.sleep(0.3)  # samples are flushed to Redis every 50 ms
            for rid in sorted(ids):
                tried += 1
                r = httpx.post(gw + "/v1/feedback", headers=auth(attacker), timeout=30,
                               json={"request_id": rid, "label": "poison"})
                accepted += r.status_code < 300
    return {"feedback_cross_key_accepted": accepted, "feedback_cross_key_tried": tried}


# ---- engine --------------------------------------------------------------------------------------
@contextlib.contextmanager
def embedded_engine(secret: str) -> Iterator[str]:
    port = free_port()
    model = StorageSettings().default_model_dir
    log = Path(tempfile.mkdtemp(prefix="abuse-engine-")) / "engine.log"
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model", str(model),
            "--port", str(port), "--max-model-len", "2048"]
    with run_server(args, port=port, log=log, timeout_s=300,
                    env={"TUNEGATE_ENGINE_API_KEY": secret}) as (base, _):
        yield base


def run_engine() -> dict[str, Any]:
    secret = "engine-secret-" + os.urandom(8).hex()
    headers = {"Authorization": f"Bearer {secret}"}
    with embedded_engine(secret) as eng:
        unauth = httpx.post(eng + "/v1/completions", timeout=120,
                            json={"prompt": "hi", "max_tokens": 1}).status_code
        gaps: list[float] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=120) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    with contextlib.suppress(httpx.HTTPError):  # counted as its wait
                        c.get(eng + "/health")
                    gaps.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.02)

        words = base64.b64encode(os.urandom(8 * MIB)).decode()
        big = " ".join(words[i:i + 7] for i in range(0, len(words), 7))  # ~12 MB
        abuse = [
            ("/v1/completions", json.dumps({"prompt": big, "max_tokens": 4}).encode()),
            ("/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": big}], "max_tokens": 4}).encode()),
            ("/v1/completions", json.dumps({"prompt": "hi", "model": "m" * (3 * MIB)}).encode()),
            ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
            ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode()),
        ]
        statuses: list[int] = []
        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(1.0)  # a baseline of idle polls
        try:
            with httpx.Client(timeout=300) as c:
                for path, raw in abuse:
                    statuses.append(c.post(eng + path, content=raw, headers={
                        **headers, "content-type": "application/json"}).status_code)
            time.sleep(0.5)
        finally:
            done.set()
            poller.join()
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
    return {"engine_health_p99_ms_under_abuse": round(p99, 1),
            "engine_health_max_ms_under_abuse": round(gaps[-1], 1),
            "engine_health_p50_ms_under_abuse": round(statistics.median(gaps), 1),
            "engine_health_polls": len(gaps), "engine_abuse_statuses": statuses,
            "unauthenticated_engine_status": unauth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz-examples", type=int, default=40)
    ap.add_argument("--fuzz-negative-examples", type=int, default=4)
    ap.add_argument("--quota-seconds", type=float, default=20.0)
    ap.add_argument("--upload-mib", type=int, default=100)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["fuzz", "anon", "upload", "quota", "feedback", "engine"])
    args = ap.parse_args()
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    out: dict[str, Any] = dict(previous)
    os.environ.pop("REDIS_URL", None)
    with redis_server() as redis_url, full_usage_replica() as engine:
        if "fuzz" not in args.skip:
            out.update(run_fuzz(engine, redis_url, args.fuzz_examples,
                                args.fuzz_negative_examples))
        if "anon" not in args.skip:
            out.update(run_anon_bodies(engine))
        if "upload" not in args.skip:
            out.update(run_upload(engine, args.upload_mib))
        if "quota" not in args.skip:
            out.update(run_quota(engine, redis_url, args.quota_seconds))
        if "feedback" not in args.skip:
            out.update(run_feedback(engine, redis_url))
    if "engine" not in args.skip:
        out.update(run_engine())
    out.update(date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               machine=f"{platform.machine()} {os.cpu_count()} cores (shared)",
               load_average=[round(x, 1) for x in os.getloadavg()])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
