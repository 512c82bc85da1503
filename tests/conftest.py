from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import StorageSettings
from tests.procs import redis_server

# Engines the tests start (in process or as children, which inherit this) run the float32
# reference: tests compare exact greedy text and logprobs against transformers and each other.
# bfloat16, the default where the CPU has it, has its own tests against float32
# (tests/engine/test_fast_path.py, test_runner.py).
os.environ.setdefault("TUNEGATE_ENGINE_DTYPE", "float32")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    path = StorageSettings().default_model_dir
    if not (path / "tunegate-model.json").is_file():
        pytest.fail(f"default model missing at {path}: run `tunegate models pull` first")
    return path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (CI and this machine run one on 6379), else a private server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with redis_server() as private:
        yield private
