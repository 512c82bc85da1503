"""GPU proof of serving (issue 5): stock vLLM on a random-weight Llama-3.1-8B shape with 4 LoRA
adapters (r 16, all linear layers), measured directly and through the tunegate gateway in one run.

Runs on the device machine (see bench/serve_device.sh); writes bench/results/serve_device.json.
Random weights measure speed, never quality. Prompts are distinct per request (no prefix-cache
hits), and every request asks for a fixed number of tokens with ``ignore_eos``. The one-stream
phase alternates requests between the engine and the gateway (``run_interleaved``), so that
``gateway_added_ms_p50`` compares the two paths under the same engine state; the concurrent
phases run directly first, then through the gateway, each as two interleaved rounds of base and
mixed-adapter load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from device_fixtures import (
    ROOT,
    VLLM_LOG,
    ensure_model,
    load_adapters,
    plugin_log_lines,
    start_gateway,
    vllm_command,
    write_adapters,
)

from shared.procs import wait_healthy

WORDS = [
    "river", "stone", "lantern", "orbit", "quiet", "maple", "copper", "harbor", "velvet",
    "signal", "meadow", "thunder", "canvas", "ember", "falcon", "glacier",
]


@dataclass
class Shot:
    ttft_s: float
    total_s: float
    tokens: int
    first_text_s: float  # the first chunk with non-empty text (see ``one``)


def prompt(rng: random.Random, n_words: int = 115) -> str:
    # About 128 tokens with the SmolLM2 tokenizer; distinct per request.
    return f"{rng.randrange(1 << 30)} " + " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str,
              text: str, max_tokens: int) -> Shot:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = first_text = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            # The first chunk that carries a choice carries the first token. Its text may be
            # empty: the random-weight model samples from 128,256 ids while the small tokenizer
            # it carries decodes only 49,152 of them, so most tokens print as "". Waiting for
            # the first non-empty text (as this bench once did) added a geometric number of
            # decode steps (p95 about +6 steps, +29 ms) to TTFT. vLLM's own serving benchmark
            # also takes TTFT at the first chunk with choices.
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
            if first_text is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first_text = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return Shot(ttft if ttft is not None else total, total, tokens,
                first_text if first_text is not None else total)


async def run_load_shots(url: str, headers: dict[str, str], models: list[str], *,
                         streams: int, requests: int, max_tokens: int,
                         seed: int) -> tuple[list[Shot], float]:
    """``requests`` requests over ``streams`` concurrent streams, models taken round-robin;
    returns every request's timings and the wall time."""
    rng = random.Random(seed)
    texts = [prompt(rng) for _ in range(requests)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    shots: list[Shot] = []
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                shots.append(await one(client, url, headers, models[i % len(models)], texts[i],
                                       max_tokens))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - start
    return shots, wall


def concurrent_round(url: str, headers: dict[str, str], models: list[str], streams: int,
                     seed: int) -> tuple[list[Shot], float]:
    """One round of a measured concurrent load: ``streams * 3`` requests of 128 tokens over
    ``streams`` streams (:func:`run_load_shots`). The warm-up runs the same rounds unmeasured."""
    return asyncio.run(run_load_shots(url, headers, models, streams=streams,
                                      requests=streams * 3, max_tokens=128, seed=seed))


async def run_load(url: str, headers: dict[str, str], models: list[str], *, streams: int,
                   requests: int, max_tokens: int, seed: int) -> dict[str, float]:
    return summarize(*await run_load_shots(url, headers, models, streams=streams,
                                           requests=requests, max_tokens=max_tokens, seed=seed))


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    model: str


async def run_interleaved(targets: list[Target], *, requests: int, max_tokens: int,
                          seed: int) -> list[list[Shot]]:
    """One stream alternating between ``targets`` (the engine directly and through the
    gateway), each request with its own prompt, the order flipped every round: both paths see
    the engine in the same state, so the difference of their TTFTs is the gateway's cost and
    not the engine's drift between two phases."""
    rng = random.Random(seed)
    shots: list[list[Shot]] = [[] for _ in targets]
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(requests):
            order = range(len(targets)) if i % 2 == 0 else reversed(range(len(targets)))
            for k in order:
                t = targets[k]
                shots[k].append(await one(client, t.url, t.headers, t.model, prompt(rng),
                                          max_tokens))
    return shots


def paired_added_ms(direct: list[Shot], gateway: list[Shot]) -> float:
    """The median over request pairs (run_interleaved: back to back, same engine state) of the
    gateway's TTFT minus the direct one: what the gateway adds to a request at p50. The
    difference of the two paths' own medians is kept beside it; it carries the spread of both."""
    return statistics.median((g.ttft_s - d.ttft_s) * 1000
                             for d, g in zip(direct, gateway, strict=True))


def summarize(shots: list[Shot], wall: float) -> dict[str, float]:
    ttfts = sorted(s.ttft_s * 1000 for s in shots)
    first_texts = sorted(s.first_text_s * 1000 for s in shots)
    decode = [(s.tokens - 1) / (s.total_s - s.ttft_s) for s in shots if s.tokens > 1]
    return {
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "ttft_ms_max": ttfts[-1],
        "first_text_ms_p95": first_texts[min(len(first_texts) - 1, int(0.95 * len(first_texts)))],
        "output_tok_s": sum(s.tokens for s in shots) / wall,
        "decode_tok_s_per_stream": statistics.median(decode) if decode else 0.0,
        "requests": len(shots),
    }


def warm_up(url: str, headers: dict[str, str], adapters: list[str], base: str,
            seed: int) -> None:
    """Requests in the shapes measured next (prefill lengths, decode lengths, every adapter), so
    that no first-time kernel selection or allocation lands in a measured tail. The concurrent
    rounds matter with tuned LoRA kernel configs: each token-count bucket has its own Triton
    config, compiled on first use (about 3 s for a prefill bucket on the H200), and only the
    decode batch sizes are compiled while vLLM captures its CUDA graphs. So, with adapters, one
    unmeasured round of each concurrent load exactly as measured (prompt lengths, request count,
    128 tokens): short warm-up requests once left a bucket to a measured round (a 2.5 s stall)."""
    asyncio.run(run_load(url, headers, [base, *adapters], streams=4, requests=16, max_tokens=32,
                         seed=seed + 99))
    if adapters:
        for streams in (16, 64):
            for models in ([base], adapters):
                concurrent_round(url, headers, models, streams, seed + 97 + streams)
    asyncio.run(run_load(url, headers, [base], streams=1, requests=16, max_tokens=128,
                         seed=seed + 98))


def measure_concurrent(url: str, headers: dict[str, str], adapters: list[str], base: str,
                       seed: int, rounds: int = 2) -> dict[str, dict[str, Any]]:
    """Output tokens/s at 16 and 64 streams, base alone and the adapters mixed, in ``rounds``
    interleaved rounds (base, lora4, base, lora4): a drift of the engine between two phases
    lands on both. Per label the figures are those of all rounds together (tokens over wall
    time, TTFT percentiles over every request), plus each round's output tokens/s. ``seed``
    picks the prompts: give each measured path its own, so that one path never meets the
    other's prompts in vLLM's prefix cache."""
    res: dict[str, dict[str, Any]] = {}
    for streams in (16, 64):
        shots: dict[str, list[Shot]] = {"base": [], "lora4": []}
        walls = {"base": 0.0, "lora4": 0.0}
        per_round: dict[str, list[float]] = {"base": [], "lora4": []}
        for r in range(rounds):
            for label, models in (("base", [base]), ("lora4", adapters)):
                got, wall = concurrent_round(url, headers, models, streams,
                                             seed + streams + 1000 * r)
                shots[label] += got
                walls[label] += wall
                per_round[label].append(summarize(got, wall)["output_tok_s"])
        for label in shots:
            res[f"conc{streams}_{label}"] = {**summarize(shots[label], walls[label]),
                                            "rounds": rounds,
                                            "output_tok_s_per_round": per_round[label]}
    return res


def write_results(out: Path, results: dict[str, Any], summary: dict[str, Any]) -> None:
    """``results`` with the headline figures of ``summary`` at the top level, as JSON to
    ``out``; prints the summary."""
    results.update(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rand8b"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_device.json")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--vllm-args", default="", help="extra vLLM arguments, one string")
    ap.add_argument("--lora-kernel-configs", default=None,
                    help="VLLM_TUNED_CONFIG_FOLDER (default: tunegate's, engine/vllm/lora_configs;"
                         " '' for vLLM's heuristic)")
    ap.add_argument("--gateway", action="store_true", help="also measure through the gateway")
    ap.add_argument("--no-lora-fold", action="store_true",
                    help="vLLM's own LoRA kernels, not tunegate's fold (TUNEGATE_VLLM_LORA_FOLD=0)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved base/lora4 rounds per concurrent phase (the issue's "
                         "stock figures used 2; more rounds average out the machine's drift)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ensure_model(args.model_dir, args.tokenizer)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    adapter_dirs = write_adapters(args.model_dir, Path("/tmp/bench-adapters"), 4, 16)

    from engine.vllm.launcher import VllmSettings, vllm_environment

    cmd = vllm_command(args.model_dir, args.port, args.vllm_args.split())
    overrides: dict[str, Any] = {"lora_fold": False} if args.no_lora_fold else {}
    base = dict(os.environ)
    if args.lora_kernel_configs is not None:  # the flag wins over the environment
        overrides["lora_kernel_configs"] = args.lora_kernel_configs
        base.pop("VLLM_TUNED_CONFIG_FOLDER", None)
    settings = VllmSettings(**overrides)
    env = {**vllm_environment("gpu", base=base, settings=settings),
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    print("VLLM_TUNED_CONFIG_FOLDER:", env.get("VLLM_TUNED_CONFIG_FOLDER"), flush=True)
    print("starting:", " ".join(cmd), flush=True)
    log = open(VLLM_LOG, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    direct = f"http://127.0.0.1:{args.port}"
    results: dict[str, Any] = {"vllm_args": cmd[cmd.index("--model"):],
                               "lora_kernel_configs": env.get("VLLM_TUNED_CONFIG_FOLDER")}
    try:
        results["vllm_start_s"] = wait_healthy(direct + "/health", proc, 900)
        names, load_ms = load_adapters(direct, adapter_dirs)
        results["adapter_load_ms_all"] = load_ms
        results["adapter_load_ms"] = statistics.median(load_ms)
        gw = None
        try:
            targets = [Target(direct, {}, "base8b")]
            warm_up(direct, {}, names, "base8b", seed=0)
            if args.gateway:
                gw_url, headers, gw = start_gateway(direct, adapter_dirs, Path("/tmp/bench-gw"),
                                                    args.port + 100, "base8b")
                targets.append(Target(gw_url, headers, "base"))
                # The base model only: the gateway's adapter versions (bench0@v1, ...) are
                # loaded after the direct phase has unloaded its own (4 LoRA slots).
                warm_up(gw_url, headers, [], "base", seed=1000)
            one_stream_shots = asyncio.run(run_interleaved(
                targets, requests=100 // (8 if args.quick else 1), max_tokens=128, seed=1))
            one_stream = [summarize(got, sum(s.total_s for s in got))
                          for got in one_stream_shots]
            results["direct"] = {"1stream": one_stream[0],
                                 **measure_concurrent(direct, {}, names, "base8b", seed=0,
                                                     rounds=args.rounds)}
            print(json.dumps(results, indent=1), flush=True)
            if gw is not None:
                for name in names:  # the gateway loads its own immutable versions
                    httpx.post(direct + "/v1/unload_lora_adapter", json={"lora_name": name},
                               timeout=60).raise_for_status()
                gw_adapters = [f"bench{i}" for i in range(4)]
                warm_up(gw_url, headers, gw_adapters, "base", seed=1000)
                results["gateway"] = {"1stream": one_stream[1], **measure_concurrent(
                    gw_url, headers, gw_adapters, "base", seed=1000, rounds=args.rounds)}
                print(json.dumps(results["gateway"], indent=1), flush=True)
        finally:
            if gw is not None:
                gw.terminate()
                gw.wait(30)
    finally:
        proc.terminate()
        proc.wait(60)
    results["plugin_log"] = plugin_log_lines()
    d = results["direct"]
    assert isinstance(d, dict)
    if args.gateway:
        g = results["gateway"]
        assert isinstance(g, dict)
        d = g  # the figures are taken through the gateway
        results["gateway_ttft_ms_p95_1stream"] = g["1stream"]["ttft_ms_p95"]
        # One stream alternating between the two paths (run_interleaved): same engine state.
        results["gateway_added_ms_p50"] = paired_added_ms(*one_stream_shots)
        results["gateway_added_ms_p50_of_medians"] = (
            g["1stream"]["ttft_ms_p50"] - results["direct"]["1stream"]["ttft_ms_p50"])
    summary = {
        "direct_ttft_ms_p95_1stream": results["direct"]["1stream"]["ttft_ms_p95"],
        "decode_tok_s_1stream": d["1stream"]["decode_tok_s_per_stream"],
        "conc64_base_tok_s": d["conc64_base"]["output_tok_s"],
        "conc64_lora4_tok_s": d["conc64_lora4"]["output_tok_s"],
        "conc16_base_tok_s": d["conc16_base"]["output_tok_s"],
        "conc16_lora4_tok_s": d["conc16_lora4"]["output_tok_s"],
        "adapter_load_ms": results["adapter_load_ms"],
    }
    for key in ("gateway_ttft_ms_p95_1stream", "gateway_added_ms_p50",
                "gateway_added_ms_p50_of_medians"):
        if key in results:
            summary[key] = results[key]
    write_results(args.out, results, summary)


if __name__ == "__main__":
    main()
