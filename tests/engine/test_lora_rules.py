"""Adapter validation rules and the LRU resident set, without a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.embedded.lora import AdapterInfo, AdapterSet, validate_adapter
from engine.errors import BadRequestError, EngineBusy, InvalidUserInput, NotFoundError

MODULES = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def adapter(tmp_path: Path, **cfg: Any) -> Path:
    path = tmp_path / "ad"
    path.mkdir()
    base = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "/somewhere/else/SmolLM2-135M-Instruct"}
    (path / "adapter_config.json").write_text(json.dumps({**base, **cfg}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def check(path: Path) -> dict[str, Any]:
    return validate_adapter("ad", path, base_names=["SmolLM2-135M-Instruct"], max_rank=8,
                            module_names=MODULES)


def test_a_fitting_adapter_passes(tmp_path: Path) -> None:
    assert check(adapter(tmp_path))["r"] == 8


@pytest.mark.parametrize("base", ["HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct",
                                  "", None])
def test_base_model_matches_by_folder_name(tmp_path: Path, base: str | None) -> None:
    check(adapter(tmp_path, base_model_name_or_path=base))


@pytest.mark.parametrize(("cfg", "words"), [
    ({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, "base model"),
    ({"r": 16}, "max_lora_rank"),
    ({"r": 0}, "rank"),
    ({"target_modules": ["q_proj", "gate_proj"]}, "gate_proj"),
    ({"target_modules": r".*\.mlp\..*"}, "match no module"),
    ({"target_modules": None}, "target_modules"),
    ({"peft_type": "IA3"}, "not a LoRA"),
])
def test_unfit_adapters_are_400(tmp_path: Path, cfg: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequestError) as info:
        check(adapter(tmp_path, **cfg))
    assert words in info.value.message and info.value.status == 400


def test_regex_targets_and_missing_files(tmp_path: Path) -> None:
    check(adapter(tmp_path, target_modules=r".*\.(q_proj|v_proj)"))
    with pytest.raises(NotFoundError):
        check(tmp_path / "nowhere")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(BadRequestError, match="weights"):
        check(tmp_path / "ad")


def info(name: str, n: int) -> AdapterInfo:
    return AdapterInfo(name=name, path=Path(name), rank=8, key=f"a{n}", created=0)


def test_lru_victim_skips_adapters_in_use() -> None:
    s = AdapterSet(max_loras=2)
    s.add(info("x", 0))
    assert s.victim(set()) is None
    s.add(info("y", 1))
    assert s.victim(set()) == "x"
    s.touch("x")
    assert s.victim(set()) == "y"
    assert s.victim({"y"}) == "x"
    with pytest.raises(EngineBusy):
        s.victim({"x", "y"})
    with pytest.raises(InvalidUserInput, match="already been loaded"):
        s.check_new("x")
    assert [a.name for a in s.list()] == ["x", "y"]  # load order, not use order
    s.remove("x")
    with pytest.raises(NotFoundError, match="cannot be found"):
        s.remove("x")
