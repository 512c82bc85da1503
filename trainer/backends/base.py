"""The one interface every training backend implements, and what they report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.data import Message
from shared.job_spec import TrainSpec

ADAPTER_MANIFEST = "tunegate-adapter.json"


@dataclass(frozen=True)
class GpuOptions:
    """The trainer settings the GPU backends read: ``TrainerSettings.gradient_checkpointing``
    and ``TrainerSettings.compile_layers`` (Unsloth's only), ``TrainerSettings.optimizer``,
    ``TrainerSettings.input_embeddings`` and ``TrainerSettings.memory_target_gib``."""

    checkpointing: str = "offload"  # offload | device
    optimizer: str = "adamw"  # adamw | adamw_8bit
    input_embeddings: str = "host"  # host | device (trainer.backends.embeddings)
    compile_layers: str = "auto"  # auto | on | off
    memory_target_gib: float = 0.0  # layers keep their activations under it (0: none do)

    # "auto" compiles from this many input tokens a job (all epochs): the compile's first step
    # (47 s in a fresh worker on an H200) is repaid by 1-2 microseconds a token (bench/README.md).
    COMPILE_FROM_TOKENS = 20_000_000

    def compiles(self, tokens: int) -> bool:
        """Whether Unsloth compiles each decoder layer for a job of ``tokens`` input tokens."""
        if self.compile_layers == "auto":
            return tokens >= self.COMPILE_FROM_TOKENS
        return self.compile_layers == "on"

    def __post_init__(self) -> None:
        if self.checkpointing not in ("offload", "device"):
            raise ValueError(f"unknown checkpointing {self.checkpointing!r}: offload or device")
        if self.optimizer not in ("adamw", "adamw_8bit"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: adamw or adamw_8bit")
        if self.input_embeddings not in ("device", "host"):
            raise ValueError(f"unknown input_embeddings {self.input_embeddings!r}: device or host")
        if self.compile_layers not in ("auto", "on", "off"):
            raise ValueError(f"unknown compile_layers {self.compile_layers!r}: auto, on or off")
        if not self.memory_target_gib >= 0:
            raise ValueError(f"memory_target_gib {self.memory_target_gib!r} is not >= 0")


class JobCancelled(Exception):
    """Raised from a step hook when the job was cancelled; training stops at that step."""


@dataclass(frozen=True)
class StepInfo:
    step: int  # optimizer steps done, 1-based
    total_steps: int
    epoch: float
    loss: float  # mean cross-entropy per supervised token of this step (nats)
    lr: float
    tokens_per_s: float  # input tokens (padding excluded) per second, whole run so far
    eta_s: float  # seconds of training left (see ``trainer.backends.loop.Eta``)
    elapsed_s: float
    tokens: int = 0  # input tokens trained on so far (padding excluded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Hooks(Protocol):
    def on_step(self, info: StepInfo) -> None:
        """Called after every optimizer step; raise :class:`JobCancelled` to stop."""

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        """Something worth recording happened (model loaded, micro-batch halved, ...)."""

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when the job was cancelled."""


class NullHooks:
    def on_step(self, info: StepInfo) -> None:
        pass

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


@dataclass
class TrainResult:
    backend: str
    steps: int
    train_s: float  # model load to saved adapter
    tokens: int  # input tokens seen, padding excluded
    final_loss: float
    micro_batch_size: int
    grad_accum: int
    adapter_dir: Path
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        d.pop("losses")
        return d


class TrainingBackend(Protocol):
    name: str

    def train(
        self, spec: TrainSpec, examples: list[list[Message]], out_dir: Path, hooks: Hooks
    ) -> TrainResult:
        """Train a LoRA adapter on ``examples`` and save it atomically at ``out_dir``."""


def base_model_hash(model_dir: str | Path) -> str:
    """A content identity of a local base model without reading gigabytes: the sha256 of the
    checksums ``tunegate models pull`` recorded, else of config.json and the files' names/sizes."""
    path = Path(model_dir)
    digest = hashlib.sha256()
    manifest = path / "tunegate-model.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        digest.update(json.dumps(files, sort_keys=True).encode())
    else:
        if (path / "config.json").is_file():
            digest.update((path / "config.json").read_bytes())
        for p in sorted(path.glob("*")):
            if p.is_file():
                digest.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def save_adapter_atomically(model: Any, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """peft ``save_pretrained`` into a temporary sibling directory, the manifest written last,
    then one rename: a reader never sees a half-written adapter at ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        (tmp / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def adapter_manifest(
    spec: TrainSpec, *, backend: str, steps: int, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": spec.name,
        "job_id": spec.job_id,
        "base_model": spec.effective_base_name,
        "base_model_path": str(spec.base_model),
        "base_model_sha256": base_model_hash(spec.base_model),
        "lora": spec.lora.model_dump(),
        "backend": backend,
        "steps": steps,
        "hyperparameters": spec.model_dump(
            include={"seed", "n_epochs", "batch_size", "learning_rate", "warmup_ratio",
                     "max_steps", "max_seq_length"}
        ),
        "created_at": time.time(),
        **extra,
    }
