"""Settings of an engine replica (``TUNEGATE_ENGINE_*``; the CLI passes its flags through)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import StorageSettings


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) that torch's
    oneDNN matmuls use; without it bfloat16 is emulated, slower than float32."""
    import torch

    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and _cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _default_model() -> Path:
    return StorageSettings().default_model_dir


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEGATE_ENGINE_", extra="ignore")

    kind: Literal["embedded", "vllm"] = "embedded"
    model: Path = Field(default_factory=_default_model)
    served_model_name: str | None = None  # default: the model folder's name
    host: str = "127.0.0.1"
    port: int = 8001
    max_loras: int = Field(4, ge=1)  # resident adapters; the least recently used goes first
    max_lora_rank: int = Field(16, ge=1)
    max_num_seqs: int = Field(16, ge=1)  # sequences in one batch
    max_model_len: int | None = Field(None, ge=16)  # tokens; default: the model's own limit
    max_logprobs: int = Field(20, ge=0)  # most top logprobs one request may ask for
    # Weights of the embedded engine's matmuls. auto: bfloat16 where the CPU computes it natively
    # (AVX512-BF16 or AMX: half the weight bytes read per step; an 8-row decode step of SmolLM2
    # on 2 cores took 34 ms against 53 in float32), float32 elsewhere (emulated bfloat16 is
    # slower than float32). The residual
    # stream, attention, KV cache and LoRA stay float32 either way. float32 is the reference
    # (parity checks compare logprobs against it).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # torch threads for the forwards; default: one per CPU. (Leaving a core to the event loop
    # was slower on 2 cores: a one-row decode step took 40 ms instead of 27.)
    threads: int | None = Field(None, ge=1)
    # fast: our own decode/prefill loop over the model's weights (Llama architecture; others,
    # and adapters it cannot apply, use hf); hf: transformers + peft, the reference.
    impl: Literal["fast", "hf"] = "fast"
    api_key: SecretStr | None = Field(
        None, description="Shared secret: every /v1 request needs `Authorization: Bearer <key>` "
        "(vLLM's --api-key; the vllm kind gets it as VLLM_API_KEY, never on its command line). "
        "Unset: the engine answers anyone who reaches its port.")
    # Graceful drain on SIGTERM (engine.drain): after deregistering, keep serving this long so
    # every gateway drops the replica (their health rounds run every 2 s), seconds; then
    # requests in flight get up to drain_timeout_s to finish before the process stops.
    drain_grace_s: float = Field(3.0, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0)

    @property
    def resolved_dtype(self) -> str:
        """The dtype ``auto`` stands for on this machine (see :func:`native_bf16`)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if native_bf16() else "float32"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name
