"""The vLLM launcher: command assembly and exec (unit). A real vllm-cpu server started by
`serve_vllm` is the contract lane's (tests/vllm/conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.vllm import launcher as vllm_launcher
from engine.vllm.launcher import VllmSettings, build_vllm_command, serve_vllm, vllm_environment

COMMON: dict[str, Any] = dict(
    model="/models/m", host="127.0.0.1", port=8123, served_model_name="base", max_loras=4,
    max_lora_rank=16, max_model_len=2048, max_num_seqs=16)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_command_has_the_module_entry_point_and_lora_flags() -> None:
    cmd = build_vllm_command(**COMMON, extra_args=[], python="/venv/bin/python", device="gpu")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--model") == "/models/m"
    assert _flag(cmd, "--host") == "127.0.0.1"
    assert _flag(cmd, "--port") == "8123"
    assert "--enable-lora" in cmd
    assert _flag(cmd, "--max-loras") == "4"
    assert _flag(cmd, "--max-lora-rank") == "16"
    assert _flag(cmd, "--served-model-name") == "base"
    assert _flag(cmd, "--max-model-len") == "2048"
    assert _flag(cmd, "--max-num-seqs") == "16"
    assert "--enforce-eager" not in cmd  # GPU keeps CUDA graphs


def test_cpu_adds_enforce_eager() -> None:
    cmd = build_vllm_command(**COMMON, python="py", device="cpu")
    assert "--enforce-eager" in cmd


def test_none_leaves_vllm_defaults() -> None:
    cmd = build_vllm_command(**{**COMMON, "served_model_name": None, "max_model_len": None,
                                "max_num_seqs": None}, python="py", device="gpu")
    for flag in ("--served-model-name", "--max-model-len", "--max-num-seqs"):
        assert flag not in cmd


def test_extra_args_come_last_so_they_override() -> None:
    cmd = build_vllm_command(**COMMON, extra_args=["--dtype", "float32", "--max-loras", "8"],
                             python="py", device="cpu")
    assert cmd[-4:] == ["--dtype", "float32", "--max-loras", "8"]
    assert cmd.index("--enforce-eager") < cmd.index("--dtype")


@pytest.mark.parametrize("field,value", [("max_loras", 0), ("max_lora_rank", 0), ("port", 0),
                                         ("port", 70000)])
def test_bad_numbers_are_rejected(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field.split("_")[-1]):
        build_vllm_command(**{**COMMON, field: value}, python="py", device="cpu")


def test_python_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEGATE_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert VllmSettings().resolve_python() == "/opt/vllm/bin/python"
    cmd = build_vllm_command(**COMMON, device="cpu")
    assert cmd[0] == "/opt/vllm/bin/python"


def test_python_from_venv_in_current_directory_is_not_resolved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEGATE_VLLM_PYTHON", raising=False)
    bin_dir = tmp_path / ".venv-vllm" / "bin"
    bin_dir.mkdir(parents=True)
    # A venv's python is a symlink to the base interpreter; following it would leave the venv.
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    assert VllmSettings().resolve_python() == str(bin_dir / "python")


def test_python_falls_back_to_this_interpreter(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEGATE_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vllm_launcher, "CHECKOUT", tmp_path / "elsewhere")
    assert VllmSettings().resolve_python() == sys.executable


def test_environment_enables_runtime_lora_and_offline() -> None:
    env = vllm_environment("cpu", base={"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "3"},
                           settings=VllmSettings(cpu_kvcache_gib=2))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/bin"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # an explicit setting wins
    assert vllm_environment("cpu", base={}, settings=VllmSettings(cpu_kvcache_gib=2))[
        "VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_environment("gpu", base={})


def test_gpu_environment_points_vllm_at_the_tuned_lora_kernel_configs() -> None:
    env = vllm_environment("gpu", base={}, settings=VllmSettings())
    assert env["VLLM_TUNED_CONFIG_FOLDER"] == str(vllm_launcher.LORA_KERNEL_CONFIGS)
    assert vllm_launcher.LORA_KERNEL_CONFIGS.is_dir()
    # The operator's own folder wins; an empty setting leaves vLLM's heuristic.
    assert vllm_environment("gpu", base={"VLLM_TUNED_CONFIG_FOLDER": "/mine"})[
        "VLLM_TUNED_CONFIG_FOLDER"] == "/mine"
    assert "VLLM_TUNED_CONFIG_FOLDER" not in vllm_environment(
        "gpu", base={}, settings=VllmSettings(lora_kernel_configs=""))
    assert "VLLM_TUNED_CONFIG_FOLDER" not in vllm_environment("cpu", base={})


def test_gpu_environment_loads_the_host_lora_metadata_plugin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = str(vllm_launcher.VLLM_PLUGIN_DIR)
    env = vllm_environment("gpu", base={"PYTHONPATH": "/site-vllm"}, settings=VllmSettings())
    assert env["PYTHONPATH"].split(os.pathsep) == [plugin, "/site-vllm"]
    assert vllm_environment("gpu", base={})["PYTHONPATH"] == plugin
    # vLLM finds it through the entry point beside the module.
    dist_info = vllm_launcher.VLLM_PLUGIN_DIR / "tunegate_vllm_plugin-1.0.dist-info"
    entry = dist_info / "entry_points.txt"
    assert "tunegate_vllm_plugin:register" in entry.read_text()
    assert (vllm_launcher.VLLM_PLUGIN_DIR / "tunegate_vllm_plugin.py").is_file()
    assert (vllm_launcher.VLLM_PLUGIN_DIR / "tunegate_lora_fold.py").is_file()
    monkeypatch.setenv("TUNEGATE_VLLM_HOST_LORA_META", "0")
    half = vllm_environment("gpu", base={})  # the fold alone still needs the plugin
    assert half["PYTHONPATH"] == plugin and half["TUNEGATE_VLLM_HOST_LORA_META"] == "0"
    assert "TUNEGATE_VLLM_LORA_FOLD" not in half
    monkeypatch.setenv("TUNEGATE_VLLM_LORA_FOLD", "0")
    off = vllm_environment("gpu", base={})
    assert "PYTHONPATH" not in off and off["TUNEGATE_VLLM_HOST_LORA_META"] == "0"
    assert off["TUNEGATE_VLLM_LORA_FOLD"] == "0"
    assert "PYTHONPATH" not in vllm_environment("cpu", base={},
                                                settings=VllmSettings(host_lora_meta=True))


def test_serve_vllm_execs_the_assembled_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEGATE_VLLM_PYTHON", sys.executable + "-vllm")
    monkeypatch.setenv("TUNEGATE_VLLM_DEVICE", "cpu")
    monkeypatch.setattr(vllm_launcher, "check_vllm_python", lambda python: None)
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    class Execd(Exception):
        pass

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise Execd

    monkeypatch.setattr(vllm_launcher.os, "execve", fake_execve)
    with pytest.raises(Execd):
        serve_vllm(**COMMON, extra_args=["--dtype", "float32"])
    path, argv, env = calls[0]
    assert path == sys.executable + "-vllm" == argv[0]
    assert "--enforce-eager" in argv and argv[-2:] == ["--dtype", "float32"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_serve_vllm_without_vllm_says_how_to_get_it(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEGATE_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(vllm_launcher.VllmNotFound, match="not an executable"):
        serve_vllm(**COMMON)
    monkeypatch.delenv("TUNEGATE_VLLM_PYTHON")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vllm_launcher, "CHECKOUT", tmp_path / "elsewhere")
    if importlib.util.find_spec("vllm") is None:  # the project's .venv has no vLLM
        with pytest.raises(vllm_launcher.VllmNotFound, match="setup_vllm_cpu.sh"):
            serve_vllm(**COMMON)


def test_cli_kind_vllm_execs_the_command_with_extra_args(tmp_path: Path) -> None:
    # /bin/echo stands in for vLLM's python: the exec'd process prints the command it was given.
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TUNEGATE_VLLM_PYTHON": "/bin/echo",
           "TUNEGATE_VLLM_DEVICE": "cpu", "TUNEGATE_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "tunegate", "engine", "serve", "--kind", "vllm", "--port", "8155",
         "--max-loras", "3", "--max-lora-rank", "32", "--dtype", "float32"],
        env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "8155"
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    assert "--enable-lora" in argv and "--enforce-eager" in argv
    assert argv[-2:] == ["--dtype", "float32"]


def test_tracing_flags_only_when_configured() -> None:
    cmd = build_vllm_command(**COMMON, python="/venv/bin/python", device="gpu",
                             otlp_traces_endpoint="http://collector:4318/v1/traces")
    assert _flag(cmd, "--otlp-traces-endpoint") == "http://collector:4318/v1/traces"
    assert "--otlp-traces-endpoint" not in build_vllm_command(
        **COMMON, python="/venv/bin/python", device="gpu")
    env = vllm_environment("cpu", base={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"  # vLLM's default: gRPC
    assert env["OTEL_SERVICE_NAME"] == "tunegate-engine-vllm"
    mine = vllm_environment("cpu", base={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                                         "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    assert mine["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" not in vllm_environment("cpu", base={})
