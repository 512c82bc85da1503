"""A/B of tunegate's vLLM plugin (host-side LoRA kernel metadata) in one vLLM server, on the
device machine (``bash bench/serve_device.sh --ab-lora-meta``).

First it checks, with vLLM's own ``LoRAKernelMeta`` on the GPU, that the plugin writes the same
metadata as vLLM's ``prepare_tensors`` for a few hundred random mappings. Then it starts vLLM
on the random-weight Llama-3.1-8B shape with 4 LoRA adapters (r 16) as bench/serve_device.py
does, with the plugin loaded and an A/B file: while the file exists, the plugin takes vLLM's own
path. After a warm-up round of both modes, each round measures both modes in turn (the order
flipped every round): output tokens/s at 64 and 16 streams, base alone and the 4 adapters
mixed, and one stream's decode rate; per round, and over all rounds together.
Writes bench/results/lora_meta_device.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from device_fixtures import ROOT, ensure_model, load_adapters, vllm_command, write_adapters
from serve_device import Shot, concurrent_round, run_load_shots, summarize, warm_up, write_results

from shared.procs import wait_healthy

PLUGIN_LOG_LINE = "LoRA kernel metadata prepared on the host"


def check_against_vllm(cases: int = 400) -> dict[str, Any]:
    """The plugin's metadata against vLLM's ``prepare_tensors``, on the GPU."""
    sys.path.insert(0, str(ROOT / "engine" / "vllm" / "plugin"))
    from tunegate_vllm_plugin import check_random_mappings
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    return {"cases": cases, "failures": check_random_mappings(
        LoRAKernelMeta, "cuda", cases=cases, max_tokens=2048, seed=0)}


def measure(url: str, adapters: list[str], seed: int) -> dict[str, tuple[list[Shot], float]]:
    """One round of one mode: every request's timings and the wall time, per phase."""
    out: dict[str, tuple[list[Shot], float]] = {}
    for streams in (64, 16):
        for label, models in (("base", ["base8b"]), ("lora4", adapters)):
            out[f"conc{streams}_{label}"] = concurrent_round(url, {}, models, streams,
                                                             seed + streams)
    for label, models in (("base", ["base8b"]), ("lora1", adapters[:1])):
        got, wall = asyncio.run(run_load_shots(url, {}, models, streams=1, requests=6,
                                               max_tokens=128, seed=seed + 1))
        out[f"1stream_{label}"] = (got, wall)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rand8b"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench" / "results" / "lora_meta_device.json")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check_only:
        print(json.dumps(check_against_vllm()))
        return

    # In a child process, so that no CUDA context of this one stays beside vLLM's.
    t0 = time.perf_counter()
    check = subprocess.run([sys.executable, __file__, "--check-only", "--tokenizer", "-"],
                           check=True, capture_output=True, text=True, cwd=ROOT)
    results: dict[str, Any] = {"check": json.loads(check.stdout.strip().splitlines()[-1]),
                               "check_s": time.perf_counter() - t0}
    print("check:", json.dumps(results["check"])[:400], flush=True)
    ensure_model(args.model_dir, args.tokenizer)
    adapter_dirs = write_adapters(args.model_dir, Path("/tmp/bench-adapters"), 4, 16)

    from engine.vllm.launcher import VllmSettings, vllm_environment

    cmd = vllm_command(args.model_dir, args.port)
    ab_file = Path("/tmp/tunegate-lora-meta-stock")
    ab_file.unlink(missing_ok=True)
    env = {**vllm_environment("gpu", settings=VllmSettings(host_lora_meta=True)),
           "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "TUNEGATE_VLLM_HOST_LORA_META_AB_FILE": str(ab_file)}
    log_path = Path("/tmp/vllm-ab.log")
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        results["vllm_start_s"] = wait_healthy(url + "/health", proc, 900)
        results["plugin_loaded"] = PLUGIN_LOG_LINE in log_path.read_text(errors="replace")
        names, _ = load_adapters(url, adapter_dirs)
        warm_up(url, {}, names, "base8b", seed=0)
        shots: dict[str, dict[str, list[Shot]]] = {"stock": {}, "host": {}}
        walls: dict[str, dict[str, float]] = {"stock": {}, "host": {}}
        per_round: list[dict[str, Any]] = []
        # Round -1 is a warm-up in the measured shapes (first-use Triton compiles of the tuned
        # LoRA configs land there, not on whichever mode would come first).
        for r in range(-1, args.rounds):
            for mode in (("stock", "host") if r % 2 == 0 else ("host", "stock")):
                if mode == "stock":
                    ab_file.touch()
                else:
                    ab_file.unlink(missing_ok=True)
                t = time.perf_counter()
                got = measure(url, names, seed=1000 * r)
                print(f"round {r} {mode}: {time.perf_counter() - t:.0f} s", flush=True)
                if r < 0:
                    continue
                per_round.append({"round": r, "mode": mode, **{
                    key: summarize(*v)["output_tok_s"] for key, v in got.items()}})
                print(json.dumps(per_round[-1]), flush=True)
                for key, (phase_shots, wall) in got.items():
                    shots[mode].setdefault(key, []).extend(phase_shots)
                    walls[mode][key] = walls[mode].get(key, 0.0) + wall
        ab_file.unlink(missing_ok=True)
        results["per_round"] = per_round
    finally:
        proc.terminate()
        proc.wait(60)
    for mode in shots:
        res: dict[str, Any] = {key: summarize(shots[mode][key], walls[mode][key])
                               for key in shots[mode]}
        res["conc64_ratio"] = (res["conc64_lora4"]["output_tok_s"]
                               / res["conc64_base"]["output_tok_s"])
        res["conc16_ratio"] = (res["conc16_lora4"]["output_tok_s"]
                               / res["conc16_base"]["output_tok_s"])
        results[mode] = res
    summary = {f"{mode}_{key}": (results[mode][key] if key.endswith("ratio")
                                 else results[mode][key]["output_tok_s"])
               for mode in ("stock", "host")
               for key in ("conc64_base", "conc64_lora4", "conc64_ratio", "conc16_base",
                           "conc16_lora4", "conc16_ratio")}
    for mode in ("stock", "host"):
        for key in ("1stream_base", "1stream_lora1"):
            summary[f"{mode}_{key}_decode_tok_s"] = results[mode][key]["decode_tok_s_per_stream"]
    summary["rounds"] = args.rounds
    summary["check_failures"] = len(results["check"]["failures"])
    summary["plugin_loaded"] = results["plugin_loaded"]
    write_results(args.out, results, summary)


if __name__ == "__main__":
    main()
