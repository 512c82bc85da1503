"""The LoRA kernel tuner's bookkeeping (engine/vllm/tune_lora.py): which kernel calls a Llama
layer makes, what is searched, and the files vLLM reads. The timing itself needs a GPU and
vLLM; it runs on the device machine (bench/lora_tune_device.sh)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.models import SHAPES
from engine.vllm.launcher import LORA_KERNEL_CONFIGS
from engine.vllm.tune_lora import candidates, config_files, layer_shapes, per_step


def test_llama_8b_layer_makes_vllms_fused_calls() -> None:
    shapes = {(s.op, s.layer): s for s in layer_shapes(SHAPES["llama-3.1-8b"], 16)}
    assert len(shapes) == 8
    # q, k, v in one call (GQA: k and v are 8 heads of 128), gate and up in one.
    assert shapes["shrink", "qkv_proj"].key() == (3, 4096, 16)
    assert shapes["expand", "qkv_proj"].out_dims == (4096, 1024, 1024)
    assert shapes["expand", "qkv_proj"].key() == (3, 16, 4096)
    assert shapes["shrink", "down_proj"].key() == (1, 14336, 16)
    assert shapes["expand", "gate_up_proj"].key() == (2, 16, 14336)
    # o_proj and down_proj expand look up the same entry.
    assert shapes["expand", "o_proj"].key() == shapes["expand", "down_proj"].key()


def test_candidates_fit_the_batch_and_the_rank() -> None:
    one = list(candidates("shrink", 1))
    assert {c["block_m"] for c in one} == {16}
    assert {c["block_m"] for c in candidates("shrink", 64)} == {16, 32, 64}
    assert {c["block_m"] for c in candidates("expand", 8192)} == {16, 32, 64}
    assert all(c["block_n"] == 16 for c in one)  # shrink's N is the rank
    assert all(c["block_k"] == 16 for c in candidates("expand", 64))  # expand's K is the rank
    keys = {"block_m", "block_n", "block_k", "num_warps", "num_ctas", "num_stages"}
    assert all(keys <= c.keys() for c in candidates("expand", 64))
    assert all(keys | {"split_k"} <= c.keys() for c in one)


def _row(op: str, layer: str, tokens: int, slices: int, k: int, n: int, default: float,
         tuned: float) -> dict[str, Any]:
    return {"op": op, "layer": layer, "tokens": tokens, "slices": slices, "k": k, "n": n,
            "default_us": default, "tuned_us": tuned, "config": {"block_m": tokens}}


def test_config_files_use_vllms_names_and_key_order() -> None:
    report = {"gpu": "NVIDIA H200", "max_loras": 4, "rows": [
        _row("shrink", "qkv_proj", 64, 3, 4096, 16, 20.0, 8.0),
        _row("expand", "gate_up_proj", 16, 2, 16, 14336, 30.0, 12.0),
    ]}
    files = config_files(report)
    assert set(files) == {"NVIDIA_H200_SHRINK.json", "NVIDIA_H200_EXPAND_TRUE.json"}
    # max_loras + 1 -> slices -> tokens -> K -> N, all keys strings (JSON objects).
    assert files["NVIDIA_H200_SHRINK.json"]["5"]["3"]["64"]["4096"]["16"] == {"block_m": 64}
    assert files["NVIDIA_H200_EXPAND_TRUE.json"]["5"]["2"]["16"]["16"]["14336"] == {
        "block_m": 16}
    rows = report["rows"]
    assert isinstance(rows, list)
    steps = per_step(rows, layers=32)
    assert steps["64"] == {"default_ms": 0.64, "tuned_ms": 0.256}


def test_shipped_configs_are_well_formed() -> None:
    """Every shipped file holds, for each lookup level, string keys down to a config with the
    fields vLLM's kernels read."""
    files = sorted(Path(LORA_KERNEL_CONFIGS).glob("*.json"))
    for path in files:
        assert path.name.endswith(("_SHRINK.json", "_EXPAND_TRUE.json")), path.name
        data = json.loads(path.read_text())

        def leaves(node: Any, depth: int) -> list[dict[str, Any]]:
            if depth == 5:
                return [node]
            assert node and all(k.isdigit() for k in node)
            return [leaf for v in node.values() for leaf in leaves(v, depth + 1)]
        for cfg in leaves(data, 0):
            need = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "num_ctas"}
            if path.name.endswith("_SHRINK.json"):
                need.add("split_k")
            assert need <= cfg.keys(), (path.name, cfg)


def test_tune_command_runs_the_file_by_path_from_any_folder(tmp_path: Path) -> None:
    """The command runs the tuner file by path (vLLM's interpreter need not have tunegate
    installed) and never puts engine/ on sys.path, where its module names would shadow others."""
    import subprocess
    import sys

    from engine.vllm.tune_lora import tune_command

    cmd = tune_command(sys.executable, model=tmp_path, out=tmp_path / "out", rank=16,
                       max_loras=4, budget_s=1.0)
    # The command's own launcher code, given a probe file in place of the tuner's.
    probe = tmp_path / "engine" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import sys\nprint(__name__, sys.argv[0] == __file__, "
                     "any(p.endswith('engine') for p in sys.path))\n")
    got = subprocess.run([*cmd[:3], str(probe)], cwd=tmp_path, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"}, check=True)
    assert got.stdout.split() == ["__main__", "True", "False"]
    helped = subprocess.run([*cmd[:4], "--help"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert helped.returncode == 0, helped.stderr
    assert "--max-loras" in helped.stdout


def test_cli_refuses_bad_arguments_and_a_missing_vllm(tmp_path: Path,
                                                      monkeypatch: Any) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["tune-lora", "--out", str(tmp_path), "--shape", "llama-3.1-8b",
                               "--model", str(tmp_path)])
    assert both.exit_code == 2 and "one of --model and --shape" in both.output
    unknown = runner.invoke(app, ["tune-lora", "--out", str(tmp_path), "--shape", "gpt-9"])
    assert unknown.exit_code == 2 and "unknown shape" in unknown.output
    monkeypatch.setenv("TUNEGATE_VLLM_PYTHON", str(tmp_path / "no-python"))
    missing = runner.invoke(app, ["tune-lora", "--out", str(tmp_path), "--shape",
                                  "llama-3.1-8b"])
    assert missing.exit_code == 2 and "not an executable file" in missing.output
