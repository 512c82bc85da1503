"""Start stock vLLM's OpenAI server as an engine replica (``tunegate engine serve --kind vllm``).

tunegate never imports vLLM: it only assembles the command line and environment of vLLM's own
entry point and hands the process over to it. vLLM lives in a virtual environment of its own
(``.venv-vllm``, see ``scripts/setup_vllm_cpu.sh``; on GPU machines any environment with vLLM),
whose interpreter is found through :class:`VllmSettings`.

The module entry point ``python -m vllm.entrypoints.openai.api_server`` is used rather than the
``vllm`` script, which fails under the ``vllm-cpu`` package name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, NotRequired, TypedDict, Unpack

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.tracing import TracingSettings

Device = Literal["auto", "cpu", "gpu"]

ENTRY_MODULE = "vllm.entrypoints.openai.api_server"
# Looked for in the current directory, then in the checkout this module lives in (an editable
# install), as scripts/setup_vllm_cpu.sh makes it.
DEFAULT_VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"
CHECKOUT = Path(__file__).resolve().parents[2]
# Tuned Triton configs for vLLM's LoRA kernels, one file set per GPU model (engine/vllm/tune_lora.py
# makes them); vLLM keeps its own heuristic on a GPU that has no file here.
LORA_KERNEL_CONFIGS = Path(__file__).resolve().parent / "lora_configs"
# tunegate's vLLM plugin (a module and its entry-point metadata, found through PYTHONPATH; see
# engine/vllm/plugin/tunegate_vllm_plugin.py): LoRA kernel metadata prepared on the host.
VLLM_PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"


class VllmSettings(BaseSettings):
    """Where vLLM's interpreter is and how it runs on a CPU (env prefix ``TUNEGATE_VLLM_``)."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_VLLM_", extra="ignore")

    # TUNEGATE_VLLM_PYTHON: the python of an environment with vLLM installed.
    python: Path | None = None
    # TUNEGATE_VLLM_DEVICE: "auto" picks "gpu" when an NVIDIA device node exists.
    device: Device = "auto"
    # TUNEGATE_VLLM_CPU_KVCACHE_GIB: KV cache size on CPU, GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    # 1 GiB holds ~46k tokens of SmolLM2-135M in bf16 (30 layers x 3 KV heads x 64 dims x K,V x
    # 2 bytes = 22.5 KiB per token). Unset, vLLM sizes the cache from a fraction of all RAM.
    cpu_kvcache_gib: int = Field(default=1, ge=1)
    # TUNEGATE_VLLM_LORA_KERNEL_CONFIGS: vLLM's VLLM_TUNED_CONFIG_FOLDER on GPUs (the tuned LoRA
    # kernel configs shipped with tunegate unless set; an empty value leaves vLLM's heuristic).
    lora_kernel_configs: str = str(LORA_KERNEL_CONFIGS)
    # TUNEGATE_VLLM_HOST_LORA_META: on GPUs, load tunegate's vLLM plugin, which prepares the LoRA
    # kernels' per-step metadata on the host instead of with two device syncs per step.
    host_lora_meta: bool = True
    # TUNEGATE_VLLM_LORA_FOLD: on GPUs, the same plugin folds each adapter slot's LoRA A rows
    # into the base layer's weight, so one GEMM does the base and the shrink and one small kernel
    # the expand (engine/vllm/plugin/tunegate_lora_fold.py); off, vLLM's own LoRA kernels run.
    lora_fold: bool = True

    def resolve_python(self) -> str:
        """The configured python, else ``.venv-vllm/bin/python`` (current directory, then the
        checkout) when present, else this interpreter."""
        if self.python is not None:
            return str(self.python)
        for candidate in (Path.cwd() / DEFAULT_VENV_PYTHON, CHECKOUT / DEFAULT_VENV_PYTHON):
            # Never resolve(): a venv's python is a symlink, and following it leaves the venv.
            if candidate.is_file():
                return str(candidate)
        return sys.executable


class VllmNotFound(RuntimeError):
    """No interpreter with vLLM: neither TUNEGATE_VLLM_PYTHON nor .venv-vllm nor this one."""


def check_vllm_python(python: str) -> None:
    """Fail with a clear message before exec'ing an interpreter that cannot run vLLM."""
    if python == sys.executable:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise VllmNotFound(
                "vLLM is not installed for this interpreter and no .venv-vllm was found: run "
                "scripts/setup_vllm_cpu.sh (CPU) or set TUNEGATE_VLLM_PYTHON to the python of an "
                "environment with vLLM")
    elif not os.access(python, os.X_OK):
        raise VllmNotFound(f"TUNEGATE_VLLM_PYTHON={python} is not an executable file")


def detect_device() -> Literal["cpu", "gpu"]:
    """``gpu`` when an NVIDIA device is visible (device node or ``nvidia-smi``), else ``cpu``.
    Cheap on purpose: no torch import just to decide a command line."""
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        return "gpu"
    return "cpu"


class VllmArgs(TypedDict):
    """What a replica asks of vLLM; ``None`` leaves vLLM's default (the model path as its name,
    the model's context length, vLLM's sequence limit). ``extra_args`` go last, verbatim."""

    model: str | Path
    host: str
    port: int
    served_model_name: str | None
    max_loras: int
    max_lora_rank: int
    max_model_len: int | None
    max_num_seqs: int | None
    extra_args: NotRequired[Sequence[str]]


def build_vllm_command(*, python: str | None = None, device: Device = "auto",
                       otlp_traces_endpoint: str | None = None,
                       **args: Unpack[VllmArgs]) -> list[str]:
    """vLLM's OpenAI server command line with runtime LoRA enabled (``args``: :class:`VllmArgs`;
    ``extra_args`` come last, so they override anything assembled here).
    ``otlp_traces_endpoint``: vLLM exports its request spans there (``--otlp-traces-endpoint``;
    it continues the ``traceparent`` the gateway sends)."""
    max_loras, max_lora_rank, port = args["max_loras"], args["max_lora_rank"], args["port"]
    if max_loras < 1:
        raise ValueError(f"max_loras must be >= 1, got {max_loras}")
    if max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    dev = detect_device() if device == "auto" else device
    py = python or VllmSettings().resolve_python()
    cmd = [
        py, "-m", ENTRY_MODULE,
        "--model", str(args["model"]),
        "--host", args["host"],
        "--port", str(port),
        "--enable-lora",
        "--max-loras", str(max_loras),
        "--max-lora-rank", str(max_lora_rank),
    ]
    if args["served_model_name"]:
        cmd += ["--served-model-name", args["served_model_name"]]
    if args["max_model_len"] is not None:
        cmd += ["--max-model-len", str(args["max_model_len"])]
    if args["max_num_seqs"] is not None:
        cmd += ["--max-num-seqs", str(args["max_num_seqs"])]
    if otlp_traces_endpoint:
        cmd += ["--otlp-traces-endpoint", otlp_traces_endpoint]
    if dev == "cpu":
        # vllm-cpu's Triton has no CPU backend here and compilation would only slow the start;
        # eager mode is the configuration the contract lane and bench/engine_cpu.py use.
        cmd += ["--enforce-eager"]
    cmd += list(args.get("extra_args", ()))
    return cmd


def vllm_environment(
    device: Device = "auto",
    base: Mapping[str, str] | None = None,
    settings: VllmSettings | None = None,
) -> dict[str, str]:
    """The environment vLLM needs: ``base`` (default: this process's) plus runtime LoRA
    updating, no hub access, no usage reporting; on CPU the KV cache size; on GPU the tuned
    LoRA kernel configs (unless ``base`` already names a VLLM_TUNED_CONFIG_FOLDER) and
    tunegate's vLLM plugin on PYTHONPATH (unless both its parts are switched off)."""
    settings = settings or VllmSettings()
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if TracingSettings.model_validate(env).enabled:
        # vLLM's exporter defaults to OTLP/gRPC; tunegate's endpoints speak OTLP/HTTP.
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        env.setdefault("OTEL_SERVICE_NAME", "tunegate-engine-vllm")
    dev = detect_device() if device == "auto" else device
    if dev == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
    else:
        if settings.lora_kernel_configs:
            env.setdefault("VLLM_TUNED_CONFIG_FOLDER", settings.lora_kernel_configs)
        if settings.host_lora_meta or settings.lora_fold:
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([str(VLLM_PLUGIN_DIR), *paths])
        # The plugin reads these, also should vLLM find it on its own path.
        if not settings.host_lora_meta:
            env["TUNEGATE_VLLM_HOST_LORA_META"] = "0"
        if not settings.lora_fold:
            env["TUNEGATE_VLLM_LORA_FOLD"] = "0"
    return env


def serve_vllm(api_key: str | None = None, drain: DrainPlan | None = None,
               **args: Unpack[VllmArgs]) -> NoReturn:
    """Replace this process by vLLM's OpenAI server (signals and exit code are then vLLM's own,
    which is what a supervisor expects). ``api_key``: the engine's shared secret, handed over as
    ``VLLM_API_KEY`` (what vLLM's ``--api-key`` defaults to) so that it never shows in ``ps``.
    With ``drain`` (a registered replica), run vLLM as a child instead and drain it on SIGTERM
    (``engine.drain.supervise``): deregister, wait for the requests in flight, then stop vLLM;
    the exit code is still vLLM's."""
    settings = VllmSettings()
    tracing = TracingSettings()
    cmd = build_vllm_command(python=settings.resolve_python(), device=settings.device,
                             otlp_traces_endpoint=tracing.traces_url if tracing.enabled else None,
                             **args)
    check_vllm_python(cmd[0])
    env = vllm_environment(settings.device, settings=settings)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    sys.stdout.flush()
    sys.stderr.flush()
    if drain is not None:
        from engine.drain import supervise

        sys.exit(supervise(cmd, env, base_url=drain.base_url, registrar=drain.registrar,
                           grace_s=drain.grace_s, timeout_s=drain.timeout_s))
    os.execve(cmd[0], cmd, env)


@dataclass(frozen=True)
class DrainPlan:
    """How :func:`serve_vllm` drains: where vLLM answers (``/metrics``), the registrar
    process to stop first, and the grace and in-flight bounds, seconds."""

    base_url: str
    registrar: subprocess.Popen[bytes] | None
    grace_s: float
    timeout_s: float
