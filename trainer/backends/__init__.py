"""Training backends behind one interface (:class:`trainer.backends.base.TrainingBackend`),
chosen by the hardware: CUDA -> Unsloth 4-bit QLoRA (or transformers + peft + bitsandbytes where
Unsloth is not installed); no CUDA -> float32 peft LoRA on the CPU."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

from trainer.backends.base import GpuOptions, TrainingBackend


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def cuda_allocator_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Expandable segments for torch's CUDA caching allocator, unless the allocator is configured
    already (``PYTORCH_CUDA_ALLOC_CONF`` or its newer name ``PYTORCH_ALLOC_CONF``). A 4-bit
    model's load and the first steps allocate many blocks of many sizes; with expandable
    segments the 8B shape loaded in 6 s instead of 10-14 and trained 3.6% faster (12,025 against
    11,605 tok/s, bench/README.md). Read when CUDA starts, so set before Unsloth's import."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def select_backend(name: str = "auto", gpu: GpuOptions | None = None) -> TrainingBackend:
    """The backend called ``name`` (``auto``: by the hardware); ``gpu``: how a GPU backend
    trains (the defaults when None)."""
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
    if name in ("unsloth", "hf_qlora"):
        cuda_allocator_defaults()
    if name == "unsloth":
        # Unsloth patches transformers on import and warns (and runs slower) when transformers
        # was imported first: import it now, before any tokenizer or model is loaded.
        import unsloth  # noqa: F401

        from trainer.backends.unsloth import UnslothBackend

        return UnslothBackend(gpu)
    if name == "hf_qlora":
        from trainer.backends.hf_qlora import HfQloraBackend

        return HfQloraBackend(gpu)
    raise ValueError(f"unknown backend {name!r}: auto, cpu, unsloth or hf_qlora")
