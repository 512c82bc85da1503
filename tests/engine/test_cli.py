"""`tunegate engine serve`: the vllm kind hands its options to the vLLM launcher unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tunegate.cli import app


def test_vllm_kind_calls_the_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import engine.vllm.launcher as launcher

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(launcher, "serve_vllm", lambda **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["engine", "serve",
        "--kind", "vllm", "--model", str(tmp_path), "--port", "9123", "--host", "0.0.0.0",
        "--max-loras", "3", "--max-lora-rank", "32", "--max-num-seqs", "64",
        "--max-model-len", "4096", "--served-model-name", "base", "--", "--enforce-eager",
    ])
    assert result.exit_code == 0, result.output
    assert calls == [{
        "model": tmp_path, "host": "0.0.0.0", "port": 9123, "served_model_name": "base",
        "max_loras": 3, "max_lora_rank": 32, "max_model_len": 4096, "max_num_seqs": 64,
        "extra_args": ["--enforce-eager"], "api_key": None, "drain": None,
    }]


def test_embedded_kind_refuses_a_missing_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["engine", "serve", "--kind", "embedded",
                                      "--model", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "no model" in result.output


def test_vllm_kind_leaves_batch_size_to_vllm(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    import engine.vllm.launcher as launcher

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(launcher, "serve_vllm", lambda **kw: calls.append(kw))
    monkeypatch.setenv("TUNEGATE_ENGINE_MAX_LORAS", "6")
    result = CliRunner().invoke(app, ["engine", "serve", "--kind", "vllm",
                                      "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (kw,) = calls
    assert kw["max_num_seqs"] is None and kw["max_model_len"] is None
    assert kw["max_loras"] == 6 and kw["max_lora_rank"] == 16  # env, then our default
    assert kw["served_model_name"] == tmp_path.name and kw["port"] == 8001
