"""The engine's dtype setting: ``auto`` is bfloat16 exactly where the CPU has native bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.settings import EngineSettings, native_bf16


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEGATE_ENGINE_DTYPE", raising=False)
    settings = EngineSettings()
    assert settings.dtype == "auto"
    has_bf16 = bool(_flags() & {"avx512_bf16", "amx_bf16"})
    assert native_bf16() == has_bf16
    assert settings.resolved_dtype == ("bfloat16" if has_bf16 else "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_kept(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.setenv("TUNEGATE_ENGINE_DTYPE", dtype)
    assert EngineSettings().resolved_dtype == dtype


def test_threads_default_to_torch_and_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEGATE_ENGINE_THREADS", raising=False)
    assert EngineSettings().threads is None
    monkeypatch.setenv("TUNEGATE_ENGINE_THREADS", "0")
    with pytest.raises(ValueError):
        EngineSettings()
