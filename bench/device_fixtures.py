"""The device machine's serving fixtures, shared by bench/serve_device.py and
bench/lora_meta_device.py: the random-weight Llama-3.1-8B shape, random LoRA adapters in peft's
format, the measured vLLM command line, run-time adapter loading, and a tunegate gateway in
front of the engine with those adapters registered. The load measurement is serve_device's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.job_spec import ALL_PROJECTIONS  # noqa: E402
from shared.procs import wait_healthy  # noqa: E402

# vLLM's output during a benchmark run; the plugin's lines are read back from it.
VLLM_LOG = Path("/tmp/vllm.log")


def write_adapters(model_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    """LoRA adapters of rank ``rank`` on all seven projections, random A and B, written in peft's
    format directly (no need to build the 8B model in peft)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    paths = []
    for a in range(n):
        gen = torch.Generator().manual_seed(a)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for mod, (d_in, d_out) in shapes.items():
                part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                    else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
                tensors[f"{key}.lora_A.weight"] = (
                    torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (
                    torch.randn(d_out, rank, generator=gen) * 0.01).to(torch.bfloat16)
        path = out / f"bench{a}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "lora_dropout": 0.0, "target_modules": list(ALL_PROJECTIONS), "bias": "none",
            "base_model_name_or_path": str(model_dir), "fan_in_fan_out": False,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
        }))
        paths.append(path)
    return paths


def ensure_model(model_dir: Path, tokenizer: Path) -> None:
    """The random-weight Llama-3.1-8B shape at ``model_dir``, built unless already there; in a
    child process, so that its GPU memory is given back before vLLM starts."""
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "tunegate", "models", "random", str(model_dir),
                        "--shape", "llama-3.1-8b", "--device", "cuda", "--tokenizer",
                        str(tokenizer)], check=True, cwd=ROOT)


def vllm_command(model_dir: Path, port: int, extra_args: list[str] | None = None) -> list[str]:
    """The measured vLLM server: served as ``base8b``, 4 LoRA slots of rank 16."""
    from engine.vllm.launcher import build_vllm_command

    return build_vllm_command(
        model=str(model_dir), host="127.0.0.1", port=port, served_model_name="base8b",
        max_loras=4, max_lora_rank=16, max_model_len=4096, max_num_seqs=256,
        extra_args=extra_args or [], python=sys.executable, device="gpu")


def load_adapters(url: str, adapter_dirs: list[Path]) -> tuple[list[str], list[float]]:
    """Loads ``adapter_dirs`` as ``bench0..N`` at run time; returns their names and each load's
    milliseconds."""
    names, load_ms = [], []
    for i, path in enumerate(adapter_dirs):
        t = time.perf_counter()
        httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": f"bench{i}", "lora_path": str(path)},
                   timeout=120).raise_for_status()
        load_ms.append((time.perf_counter() - t) * 1000)
        names.append(f"bench{i}")
    return names, load_ms


def start_gateway(engine_url: str, adapter_dirs: list[Path], work: Path, port: int,
                  base_name: str) -> tuple[str, dict[str, str], subprocess.Popen[bytes]]:
    """The tunegate gateway in front of ``engine_url``: the adapters registered as
    ``bench0..N`` (their ``stable`` alias at v1) in a fresh registry under ``work``, an admin key,
    and a gateway process. Returns its URL, the auth headers and the process."""
    import shutil

    from shared.db import Database, database_url
    from shared.registry import Registry

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    registry = Registry(Database(database_url(work)), str(work / "artifacts"))
    for i, src in enumerate(adapter_dirs):
        shutil.copytree(src, work / "artifacts" / "staging" / f"bench{i}")
        version = registry.register_version(f"bench{i}", f"staging/bench{i}",
                                            {"base_model": base_name})
        registry.set_alias(f"bench{i}", "stable", version.version, reason="bench")
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(work), "HF_HUB_OFFLINE": "1"}
    key = "tg-bench-" + os.urandom(8).hex()
    subprocess.run([sys.executable, "-m", "tunegate", "keys", "create", "--name", "bench",
                    "--scope", "admin", "--key", key], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    log = open(work / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "tunegate", "gateway", "serve", "--port",
                             str(port), "--engine", engine_url], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url + "/health", proc, 120)
    return url, {"Authorization": f"Bearer {key}"}, proc


def plugin_log_lines(log: Path = VLLM_LOG) -> list[str]:
    """What tunegate's plugin said in vLLM's log (host metadata, LoRA fold), each line once."""
    return sorted({line.split("tunegate plugin: ", 1)[1].strip()
                   for line in log.read_text(errors="replace").splitlines()
                   if "tunegate plugin: " in line})
