"""Training backends behind one interface (:class:`trainer.backends.base.TrainingBackend`),
chosen by the hardware: CUDA -> Unsloth 4-bit QLoRA (or transformers + peft + bitsandbytes where
Unsloth is not installed); no CUDA -> float32 peft LoRA on the CPU."""

from __future__ import annotations

import importlib.util

from trainer.backends.base import TrainingBackend


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def select_backend(name: str = "auto", checkpointing: str = "offload") -> TrainingBackend:
    """The backend called ``name`` (``auto``: by the hardware); ``checkpointing`` is
    ``TrainerSettings.gradient_checkpointing`` (Unsloth only)."""
    if name == "auto":
        if not cuda_available():
            name = "cpu"
        elif importlib.util.find_spec("unsloth") is not None:
            name = "unsloth"
        else:
            name = "hf_qlora"
    if name == "cpu":
        from trainer.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "unsloth":
        # Unsloth patches transformers on import and warns (and runs slower) when transformers
        # was imported first: import it now, before any tokenizer or model is loaded.
        import unsloth  # noqa: F401

        from trainer.backends.unsloth import UnslothBackend

        return UnslothBackend(checkpointing=checkpointing)
    if name == "hf_qlora":
        from trainer.backends.hf_qlora import HfQloraBackend

        return HfQloraBackend()
    raise ValueError(f"unknown backend {name!r}: auto, cpu, unsloth or hf_qlora")
