"""Fixtures of the engine's end-to-end tests: one real embedded engine process (real SmolLM2) for
the whole session, and LoRA adapters made here (peft LoRA with random non-zero B matrices)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port, run_server
from tests.protocol_checks import make_adapter

# Small limits keep the tests cheap and make the bounds reachable.
ENGINE_MAX_LORAS = 2
ENGINE_MAX_LORA_RANK = 8
ENGINE_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def engine_url(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("engine-log") / "engine.log"
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded",
            "--model", str(default_model_dir), "--port", str(port),
            "--max-loras", str(ENGINE_MAX_LORAS), "--max-lora-rank", str(ENGINE_MAX_LORA_RANK),
            "--max-model-len", str(ENGINE_MAX_MODEL_LEN), "--max-num-seqs", "8"]
    with run_server(args, port=port, log=log, timeout_s=240) as (base, _proc):
        yield base


@pytest.fixture(scope="session")
def model_name(default_model_dir: Path) -> str:
    return default_model_dir.name


@pytest.fixture(scope="session")
def adapters(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good adapters ``a1`` .. ``a3`` (different seeds and targets) and bad ones."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a1": make_adapter(default_model_dir, root / "a1", rank=8, seed=1,
                            targets=["q_proj", "v_proj"]),
        "a2": make_adapter(default_model_dir, root / "a2", rank=4, seed=2,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "a3": make_adapter(default_model_dir, root / "a3", rank=8, seed=3,
                            targets=["gate_proj", "up_proj", "down_proj"]),
        "rank16": make_adapter(default_model_dir, root / "rank16", rank=16, seed=4,
                                targets=["q_proj"]),
    }

    def variant(name: str, **changes: object) -> None:
        dst = root / name
        shutil.copytree(out["a1"], dst)
        cfg_file = dst / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(changes)
        cfg_file.write_text(json.dumps(cfg))
        out[name] = dst

    variant("wrong_base", base_model_name_or_path="/models/Llama-3.1-8B-Instruct")
    variant("bad_target", target_modules=["q_proj", "no_such_proj"])
    return out


@pytest.fixture
def unload_all(engine_url: str, model_name: str) -> Iterator[None]:
    """Start (and leave) the engine with no adapters loaded."""

    def clear() -> None:
        for card in httpx.get(f"{engine_url}/v1/models").json()["data"]:
            if card["id"] != model_name:
                httpx.post(f"{engine_url}/v1/unload_lora_adapter",
                           json={"lora_name": card["id"]})

    clear()
    yield
    clear()
